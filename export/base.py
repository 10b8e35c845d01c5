"""The one small interface every export target implements (gpt-fast style), and the eager reference.

A target turns a `MobileVLM` student into artifact files (`export`) and loads them back into a
`Runtime` (`load`): three calls, exactly the ones the Android app makes — `encode_image` (pixels →
image tokens), `embed` (ids → embeddings) and `decode` (embeddings at a start position → logits, with the
runtime's own KV cache). `EagerRuntime` is the same interface over the PyTorch model: the reference of the
parity gate and of the desktop emulator. The decoding loop over a `Runtime` is written once, in
`alignkd.export.runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import DynamicCache

from alignkd.model.mobilevlm import MobileVLM


@dataclass
class ExportOptions:
    """What a target needs besides the model. Each target documents which fields it reads."""

    quant: str = "fp32"
    """Weight quantization; each target lists what it supports in `quants`."""
    max_seq_len: int = 512
    """Static KV-cache length (ExecuTorch), context length (GGUF), max positions (ONNX metadata)."""
    group_size: int | None = None
    """Group / block size of 4-bit weights; None: the target's `default_group_size` (see `group`)."""
    embedding_quant: str | None = None
    """ExecuTorch only: "8" or "4" bit embedding table (None keeps it in the weight dtype)."""
    threads: int = 2
    """CPU threads of the runtime when an artifact is loaded for parity or benchmarks."""
    extra: dict = field(default_factory=dict)
    """Target-specific knobs, documented by the target."""

    def group(self, default: int) -> int:
        """The group size in effect: `group_size`, or the reading target's default when it is None."""
        return default if self.group_size is None else self.group_size


class Runtime(Protocol):
    """A loaded artifact, stepped as the app steps it. Arrays are numpy, batch 1."""

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """(1, 3, S, S) float32 normalised pixels → (N, H) float32 image tokens."""

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(T,) int64 token ids → (T, H) float32 embeddings."""

    def decode(self, embeds: np.ndarray, start_pos: int) -> np.ndarray:
        """(T, H) embeddings placed at positions start_pos.. → (V,) float32 logits of the last position.

        Positions before start_pos come from the runtime's cache (what earlier calls fed); start_pos 0
        starts a new sequence.
        """


class ExportTarget(Protocol):
    name: str
    """Format name used on the command line: "pte", "onnx" or "gguf"."""
    quants: tuple[str, ...]
    """Supported values of ExportOptions.quant."""
    default_group_size: int
    """4-bit group size when ExportOptions.group_size is None: the fastest of the runtime's kernels at
    the accuracy we gate (README, Results)."""

    def export(self, model: MobileVLM, tokenizer, out_dir: Path, options: ExportOptions) -> list[Path]:
        """Write the artifacts into out_dir (which exists) and return their paths."""

    def load(self, out_dir: Path, options: ExportOptions) -> Runtime:
        """Load what `export` wrote into its desktop runtime."""

    def reference(self, model: MobileVLM, options: ExportOptions) -> Runtime:
        """The eager runtime the artifact must match (usually `EagerRuntime(model)`)."""

    # Optional: `thresholds(options) -> Thresholds` when the gate depends on more than the quant, and
    # `quantized_reference(model, options, out_dir) -> Runtime`, the eager model with the artifact's own
    # (de-)quantized weights, reported beside the gate to separate runtime error from quantization error.


class EagerRuntime:
    """`Runtime` over the PyTorch model: the reference every artifact is checked against."""

    def __init__(self, model: MobileVLM):
        self.model = model.eval()
        self.cache: DynamicCache | None = None
        self.pos = 0

    @torch.no_grad()
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.model.encode_images(torch.from_numpy(pixels).float())[0].float().numpy()  # (N, H)

    @torch.no_grad()
    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.model.embed_tokens(torch.from_numpy(ids).long()[None])[0].float().numpy()  # (T, H)

    @torch.no_grad()
    def decode(self, embeds: np.ndarray, start_pos: int) -> np.ndarray:
        if start_pos == 0:
            self.cache = DynamicCache()
        elif start_pos != self.pos:
            raise ValueError(f"decode at position {start_pos}, but the cache holds {self.pos} positions")
        x = torch.from_numpy(embeds).float()[None]  # (1, T, H)
        positions = torch.arange(start_pos, start_pos + x.shape[1])[None]
        logits = self.model.run_lm(x, position_ids=positions, cache=self.cache)  # (1, T, V)
        self.pos = start_pos + x.shape[1]
        return logits[0, -1].float().numpy()  # (V,)
