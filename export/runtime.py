"""The decoding loop over any `Runtime` — eager, ExecuTorch, ONNX or GGUF — written once.

It does what the Android app does: encode the image (or take its tokens from an `ImageTokenCache`), embed
the prompt around the image token, splice, prefill from position 0 (or, for a follow-up question about the
same image, only the new text after the kept prefix: `PromptPrefix`), then feed one token at a time at
increasing start positions. The parity gate, the desktop emulator and the benchmarks all call `generate`.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from alignkd.errors import ConfigError, DataError
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
    """Seconds: image, prefill, decode (all steps); the count of decode steps; whether the image tokens came
    from the cache (image_cached)."""
    step_logits: list[np.ndarray] = field(default_factory=list)
    """(V,) logits of every step, when asked for."""


class ImageTokenCache:
    """The image tokens of the most recent images, least recently used evicted first.

    Keyed by the sha256 of the preprocessed pixels as float32 little-endian bytes (`key`), so a follow-up
    question about the same image skips the vision encoder (on a phone the longest wait before the first
    token) and any change of the image or of its preprocessing is a miss. The app's core keeps the same
    cache with the same key (android_demo/core, `ImageTokenCache`). Capacity 0 caches nothing.
    """

    DEFAULT_CAPACITY = 4

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ConfigError(f"image cache capacity must be an integer >= 0, got {capacity!r}")
        self.capacity = capacity
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()

    @staticmethod
    def key(pixels: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(pixels, dtype="<f4").tobytes()).hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        tokens = self._entries.get(key)
        if tokens is not None:
            self._entries.move_to_end(key)
        return tokens

    def put(self, key: str, tokens: np.ndarray) -> None:
        if self.capacity == 0:
            return
        tokens = np.array(tokens, dtype=np.float32)  # a copy the caller cannot change
        tokens.setflags(write=False)
        self._entries[key] = tokens
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def keys(self) -> list[str]:
        """Least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class PromptPrefix:
    """What the runtime's KV cache holds of the last prompt, up to and including its image: the token ids
    before the image token, the image's cache key and the positions they fill.

    A follow-up prompt with the same ids before the image and the same image, while that image is still in
    the `ImageTokenCache`, continues from there: only the rest of the prompt (the new question) is
    prefilled, at start_pos = those positions, as llama.cpp's server reuses a prompt's common prefix.
    Without it a follow-up still skips the encoder but prefills the image's positions again. One per
    runtime (what it describes is that runtime's cache)."""

    def __init__(self):
        self.ids: list[int] | None = None
        self.key: str | None = None
        self.positions = 0

    def reusable(self, before: list[int], key: str, image_cache: ImageTokenCache) -> bool:
        return self.ids == before and self.key == key and image_cache.get(key) is not None

    def keep(self, before: list[int], key: str, positions: int) -> None:
        self.ids, self.key, self.positions = list(before), key, positions

    def clear(self) -> None:
        self.ids, self.key, self.positions = None, None, 0


def check_pixels(pixels: np.ndarray, image_size: int) -> None:
    """Refuse pixels of another shape than (1, 3, S, S): a runtime could resize them silently (mtmd does)."""
    if tuple(np.shape(pixels)) != (1, 3, image_size, image_size):
        raise DataError(f"pixels of shape {tuple(np.shape(pixels))}, the bundle's encoder takes (1, 3, {image_size}, "
                        f"{image_size}): preprocess the image with the bundle's preprocessing.json")


def splice_prompt(runtime: Runtime, prompt_ids: list[int], pixels: np.ndarray | None,
                  image_cache: ImageTokenCache | None = None) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Token ids with at most one IMAGE_TOKEN_INDEX → (T, H) prompt embeddings, the image tokens, and
    whether they came from `image_cache` (the encoder is not called then)."""
    n_img = prompt_ids.count(IMAGE_TOKEN_INDEX)
    if n_img > 1:
        raise DataError("at most one image per prompt is supported")
    if (n_img == 1) != (pixels is not None):
        raise DataError("the prompt has an image token but no image was given" if n_img else
                        "an image was given but the prompt has no <image> token")
    if not n_img:
        return runtime.embed(np.asarray(prompt_ids, dtype=np.int64)), None, False
    k = prompt_ids.index(IMAGE_TOKEN_INDEX)
    key = image_cache.key(pixels) if image_cache is not None else None
    image = image_cache.get(key) if key is not None else None
    cached = image is not None
    if not cached:
        image = runtime.encode_image(pixels.astype(np.float32))  # (N, H)
        if image_cache is not None:
            image_cache.put(key, image)
    parts = [runtime.embed(np.asarray(p, dtype=np.int64)) for p in (prompt_ids[:k], prompt_ids[k + 1:]) if p]
    before = parts[0] if k > 0 else np.zeros((0, image.shape[1]), np.float32)
    after = parts[-1] if k + 1 < len(prompt_ids) else np.zeros((0, image.shape[1]), np.float32)
    return np.concatenate([before, image, after]), image, cached  # (T, H)


def check_decoding(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse decoding options that have no meaning (a top-p of 0 keeps no token to sample from)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens (--max-new-tokens) must be at least 1, got {max_new_tokens}")
    if not temperature >= 0 or temperature == float("inf"):
        raise ConfigError(f"temperature (--temperature) must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p (--top-p) must be in (0, 1], got {top_p}")


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
    *,
    image_cache: ImageTokenCache | None = None,
    image_size: int | None = None,
    prefix: PromptPrefix | None = None,
) -> Generation:
    """Greedy (temperature 0) or sampled decoding of one prompt through `runtime`.

    eos_id None decodes exactly max_new_tokens tokens (speed runs, as llama-bench: a short answer would
    leave no decode steps to time). image_cache: image tokens of recent images (see `ImageTokenCache`).
    image_size: when given, pixels of another shape than (1, 3, S, S) are refused before any compute.
    prefix: with image_cache, a follow-up question about the same image prefills only the new text (see
    `PromptPrefix`); it must describe this runtime's cache (pass the same one for every call).
    """
    check_decoding(max_new_tokens, temperature, top_p)
    n_prompt = check_fits(prompt_ids, max_new_tokens, max_seq_len, num_image_tokens)
    if pixels is not None and image_size is not None:
        check_pixels(pixels, image_size)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    k = prompt_ids.index(IMAGE_TOKEN_INDEX) if IMAGE_TOKEN_INDEX in prompt_ids else None
    before, rest = (prompt_ids[:k], prompt_ids[k + 1:]) if k is not None else (None, None)
    key = ImageTokenCache.key(pixels) if k is not None and image_cache is not None and prefix is not None else None
    reuse = key is not None and bool(rest) and prefix.reusable(before, key, image_cache)
    if reuse:  # the cache holds the prompt up to and including this image: prefill the new text only
        start = prefix.positions
        embeds, image, cached = runtime.embed(np.asarray(rest, dtype=np.int64)), image_cache.get(key), True
    else:
        start = 0
        embeds, image, cached = splice_prompt(runtime, prompt_ids, pixels, image_cache)
    t1 = time.perf_counter()
    if prefix is not None:
        prefix.clear()  # until this prefill has gone through
    prompt_logits = runtime.decode(embeds, start)
    t2 = time.perf_counter()
    if prefix is not None:
        if key is not None:
            prefix.keep(before, key, len(before) + image.shape[0])
        else:
            prefix.clear()
    steps: list[np.ndarray] = []
    pos = [start + embeds.shape[0]]

    def step(nxt: torch.Tensor) -> torch.Tensor:  # (1,) id → (1, V) logits, through the app's two calls
        logits = runtime.decode(runtime.embed(nxt.numpy().astype(np.int64)), pos[0])
        pos[0] += 1
        return torch.from_numpy(np.asarray(logits, np.float32))[None]

    keep = (lambda lg: steps.append(lg[0].numpy())) if keep_step_logits else None
    tokens = decode_loop(torch.from_numpy(np.asarray(prompt_logits, np.float32))[None], step, max_new_tokens, eos_id,
                         temperature, top_p, gen, on_logits=keep)[0]
    t3 = time.perf_counter()
    timings = {"image_s": t1 - t0, "prefill_s": t2 - t1, "decode_s": t3 - t2,
               "decode_steps": pos[0] - start - embeds.shape[0], "image_cached": cached, "prefix_reused": reuse,
               "prefill_positions": embeds.shape[0]}
    return Generation(tokens, prompt_logits, image, n_prompt, timings, steps)


def forced_logits(runtime: Runtime, prompt_ids: list[int], pixels: np.ndarray | None, tokens: list[int]) -> list[np.ndarray]:
    """Teacher forcing: the (V,) logits before each of `tokens`, feeding the given tokens one by one.

    Comparing the argmax of these with `tokens` (a reference's greedy output) gives per-step top-1
    agreement that one early divergence cannot cascade into.
    """
    embeds, _, _ = splice_prompt(runtime, prompt_ids, pixels)
    out = [runtime.decode(embeds, 0)]
    pos = embeds.shape[0]
    for tok in tokens[:-1]:
        out.append(runtime.decode(runtime.embed(np.asarray([tok], dtype=np.int64)), pos))
        pos += 1
    return out
