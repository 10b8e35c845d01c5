"""The decoding loop over any `Runtime` — eager, ExecuTorch, ONNX or GGUF — written once.

It does what the Android app does: encode the image, embed the prompt around the image token, splice,
prefill from position 0, then feed one token at a time at increasing start positions. The parity gate,
the desktop emulator and the benchmarks all call `generate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from alignkd.errors import DataError
from alignkd.model.config import IMAGE_TOKEN_INDEX
from alignkd.model.decoding import decode_loop

from .base import Runtime


@dataclass
class Generation:
    tokens: list[int]
    """New tokens, EOS excluded."""
    prompt_logits: np.ndarray
    """(V,) logits after the prompt: the first decoding step."""
    image_embeddings: np.ndarray | None
    """(N, H) what encode_image returned (None for a text-only prompt)."""
    prompt_len: int
    """Positions fed in the prefill (image tokens included)."""
    timings: dict = field(default_factory=dict)
    """Seconds: image, prefill, decode (all steps), and the count of decode steps."""
    step_logits: list[np.ndarray] = field(default_factory=list)
    """(V,) logits of every step, when asked for."""


def splice_prompt(runtime: Runtime, prompt_ids: list[int], pixels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Token ids with at most one IMAGE_TOKEN_INDEX → (T, H) prompt embeddings, and the image tokens."""
    n_img = prompt_ids.count(IMAGE_TOKEN_INDEX)
    if n_img > 1:
        raise DataError("at most one image per prompt is supported")
    if (n_img == 1) != (pixels is not None):
        raise DataError("the prompt has an image token but no image was given" if n_img else
                        "an image was given but the prompt has no <image> token")
    if not n_img:
        return runtime.embed(np.asarray(prompt_ids, dtype=np.int64)), None
    k = prompt_ids.index(IMAGE_TOKEN_INDEX)
    image = runtime.encode_image(pixels.astype(np.float32))  # (N, H)
    parts = [runtime.embed(np.asarray(p, dtype=np.int64)) for p in (prompt_ids[:k], prompt_ids[k + 1:]) if p]
    before = parts[0] if k > 0 else np.zeros((0, image.shape[1]), np.float32)
    after = parts[-1] if k + 1 < len(prompt_ids) else np.zeros((0, image.shape[1]), np.float32)
    return np.concatenate([before, image, after]), image  # (T, H)


def prompt_positions(prompt_ids: list[int], num_image_tokens: int) -> int:
    """How many positions a prompt occupies once its image token expands."""
    return len(prompt_ids) + (num_image_tokens - 1) * prompt_ids.count(IMAGE_TOKEN_INDEX)


def check_fits(prompt_ids: list[int], max_new_tokens: int, max_seq_len: int | None, num_image_tokens: int = 144) -> int:
    """Refuse, before any compute, a prompt that would overflow a static KV cache; return its positions."""
    n = prompt_positions(prompt_ids, num_image_tokens)
    if max_seq_len is not None and n + max_new_tokens > max_seq_len:
        raise DataError(f"prompt of {n} positions + {max_new_tokens} new tokens exceeds max_seq_len {max_seq_len}")
    return n


def generate(
    runtime: Runtime,
    prompt_ids: list[int],
    pixels: np.ndarray | None,
    max_new_tokens: int,
    eos_id: int | None,
    max_seq_len: int | None = None,
    num_image_tokens: int = 144,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    keep_step_logits: bool = False,
) -> Generation:
    """Greedy (temperature 0) or sampled decoding of one prompt through `runtime`.

    eos_id None decodes exactly max_new_tokens tokens (speed runs, as llama-bench: a short answer would
    leave no decode steps to time).
    """
    n_prompt = check_fits(prompt_ids, max_new_tokens, max_seq_len, num_image_tokens)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    embeds, image = splice_prompt(runtime, prompt_ids, pixels)
    t1 = time.perf_counter()
    prompt_logits = runtime.decode(embeds, 0)
    t2 = time.perf_counter()
    steps: list[np.ndarray] = []
    pos = [embeds.shape[0]]

    def step(nxt: torch.Tensor) -> torch.Tensor:  # (1,) id → (1, V) logits, through the app's two calls
        logits = runtime.decode(runtime.embed(nxt.numpy().astype(np.int64)), pos[0])
        pos[0] += 1
        return torch.from_numpy(np.asarray(logits, np.float32))[None]

    keep = (lambda lg: steps.append(lg[0].numpy())) if keep_step_logits else None
    tokens = decode_loop(torch.from_numpy(np.asarray(prompt_logits, np.float32))[None], step, max_new_tokens, eos_id,
                         temperature, top_p, gen, on_logits=keep)[0]
    t3 = time.perf_counter()
    timings = {"image_s": t1 - t0, "prefill_s": t2 - t1, "decode_s": t3 - t2, "decode_steps": pos[0] - embeds.shape[0]}
    return Generation(tokens, prompt_logits, image, n_prompt, timings, steps)


def forced_logits(runtime: Runtime, prompt_ids: list[int], pixels: np.ndarray | None, tokens: list[int]) -> list[np.ndarray]:
    """Teacher forcing: the (V,) logits before each of `tokens`, feeding the given tokens one by one.

    Comparing the argmax of these with `tokens` (a reference's greedy output) gives per-step top-1
    agreement that one early divergence cannot cascade into.
    """
    embeds, _ = splice_prompt(runtime, prompt_ids, pixels)
    out = [runtime.decode(embeds, 0)]
    pos = embeds.shape[0]
    for tok in tokens[:-1]:
        out.append(runtime.decode(runtime.embed(np.asarray([tok], dtype=np.int64)), pos))
        pos += 1
    return out
