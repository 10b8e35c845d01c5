"""The one small interface every export target implements (gpt-fast style), its registry, and the eager reference.

A target turns a `MobileVLM` student into artifact files (`export`) and loads them back into a
`Runtime` (`load`): three calls, exactly the ones the Android app makes — `encode_image` (pixels →
image tokens), `embed` (ids → embeddings) and `decode` (embeddings at a start position → logits, with the
runtime's own KV cache) — and `close`. `EagerRuntime` is the same interface over the PyTorch model: the
reference of the parity gate and of the desktop emulator. The decoding loop over a `Runtime` is written
once, in `alignkd.export.runtime`; the gate, in `alignkd.export.parity`.

What differs between targets is carried by the interface, with defaults in `TargetBase`: the target's own
options (a dataclass, filled from `ExportOptions.extra`), its parity thresholds, its reference, an optional
same-quantization reference and an optional extra report. `get_target(name)` imports a target on use, so
one target's heavy runtime loads only when asked.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from transformers import DynamicCache

from alignkd.errors import ConfigError
from alignkd.model.mobilevlm import MobileVLM

if TYPE_CHECKING:
    from .parity import Thresholds

# format name → (module, class)
TARGETS: dict[str, tuple[str, str]] = {
    "pte": ("alignkd.export.executorch", "ExecuTorchTarget"),
    "onnx": ("alignkd.export.onnx_export", "OnnxTarget"),
    "gguf": ("alignkd.export.gguf.target", "GgufTarget"),
}


# More runtime threads than any CPU has only makes the runtimes' thread pools thrash (100,000 hung llama.cpp).
MAX_THREADS = 256


def check_threads(threads) -> None:
    """Runtime threads (`--threads`): 1 to MAX_THREADS (100000 hung llama.cpp)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"threads (--threads) must be between 1 and {MAX_THREADS}, got {threads}")


@dataclass
class ExportOptions:
    """What every target reads besides the model; a target's own knobs are in `extra`."""

    quant: str = "fp32"
    """Weight quantization of the LM; each target lists what it supports in `quants`."""
    max_seq_len: int = 512
    """Static KV-cache length (ExecuTorch), context length (GGUF), max positions (ONNX)."""
    threads: int = 2
    """CPU threads of the runtime when an artifact is loaded for parity or benchmarks."""
    extra: dict = field(default_factory=dict)
    """The target's own options by name (the fields of its `Options` dataclass). Values may be strings, as
    typed on the command line (`--opt key=value`): `target.options(...)` converts and checks them."""


class Runtime(Protocol):
    """A loaded artifact, stepped as the app steps it. Arrays are numpy, batch 1."""

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """(1, 3, S, S) float32 normalised pixels → (N, H) float32 image tokens."""

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(T,) int64 token ids → (T, H) float32 embeddings."""

    def decode(self, embeds: np.ndarray, start_pos: int) -> np.ndarray:
        """(T, H) embeddings placed at positions start_pos.. → (V,) float32 logits of the last position.

        Positions before start_pos come from the runtime's cache (what earlier calls fed); start_pos may be
        below what the cache holds, which drops the positions from start_pos on (0 starts a new sequence;
        a follow-up question continues after a kept prompt prefix). Beyond what it holds is an error.
        """

    def close(self) -> None:
        """Free what the runtime holds (sessions, native contexts, model copies); it is not used again."""


class ExportTarget(Protocol):
    name: str
    """Format name used on the command line: "pte", "onnx" or "gguf"."""
    quants: tuple[str, ...]
    """Supported values of ExportOptions.quant."""
    default_quant: str
    """The quant of an export that names none."""
    Options: type
    """Dataclass of the target's own options (`ExportOptions.extra`), each field documented."""

    def options(self, options: ExportOptions):
        """`ExportOptions.extra` converted and checked into `Options`, defaults resolved for options.quant."""

    def check(self, model: MobileVLM, options: ExportOptions) -> None:
        """Refuse a bad request (quant, options, max_seq_len for this model) before anything is written."""

    def export(self, model: MobileVLM, tokenizer, out_dir: Path, options: ExportOptions) -> list[Path]:
        """Write the artifacts into out_dir (which exists) and return their paths."""

    def load(self, out_dir: Path, options: ExportOptions) -> Runtime:
        """Load what `export` wrote into its desktop runtime."""

    def reference(self, model: MobileVLM, options: ExportOptions) -> Runtime:
        """The eager runtime the artifact is gated against; its image tokens are the fp32 encoder's."""

    def thresholds(self, options: ExportOptions) -> Thresholds:
        """The parity gate of this export (LM quant, vision quant and any other quantized part combined)."""

    def quantized_reference(self, model: MobileVLM, options: ExportOptions, out_dir: Path) -> Runtime | None:
        """The eager model with the artifact's own (de-)quantized weights, reported beside the gate to
        separate runtime error from quantization error; None when there is nothing to separate."""

    def extra_report(self, model: MobileVLM, artifact: Runtime, prompt_ids: list[int], pixels: np.ndarray) -> dict:
        """What else the parity report states for this target (e.g. GGUF's divergence from the faithful model)."""


class TargetBase:
    """The defaults of `ExportTarget`; each target subclasses it and overrides what differs."""

    name: str
    quants: tuple[str, ...]
    default_quant: str

    @dataclass(frozen=True)
    class Options:
        """No options of its own."""

    def options(self, options: ExportOptions):
        return parse_options(self.Options, options.extra, self.name)

    def check(self, model: MobileVLM, options: ExportOptions) -> None:
        if options.quant not in self.quants:
            raise ConfigError(f"{self.name}: quant {options.quant!r} is not supported (supported: {', '.join(self.quants)})")
        self.options(options)
        limit = model.config.text.max_position_embeddings
        need = model.config.num_image_tokens + 1
        if not need <= options.max_seq_len <= limit:
            raise ConfigError(f"{self.name}: max_seq_len {options.max_seq_len} must be between {need} (the image plus "
                              f"one token) and the model's context of {limit}")

    def reference(self, model: MobileVLM, options: ExportOptions) -> Runtime:
        return EagerRuntime(model)

    def quantized_reference(self, model: MobileVLM, options: ExportOptions, out_dir: Path) -> Runtime | None:
        return None

    def extra_report(self, model: MobileVLM, artifact: Runtime, prompt_ids: list[int], pixels: np.ndarray) -> dict:
        return {}


def get_target(name: str) -> ExportTarget:
    if name not in TARGETS:
        raise ConfigError(f"unknown export format {name!r} (supported: {', '.join(TARGETS)})")
    module, cls = TARGETS[name]
    return getattr(importlib.import_module(module), cls)()


def option_names(target: ExportTarget) -> list[str]:
    return [f.name for f in dataclasses.fields(target.Options)]


# ---- options from strings --------------------------------------------------------------------------
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _convert(value, typ, where: str):
    """A value of `typ` (str, int, bool, or one of them | None) from a Python value or a command-line string."""
    args = typing.get_args(typ)
    if type(None) in args:  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        (typ,) = [a for a in args if a is not type(None)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if typ is str and isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: cannot use {value!r}")


def parse_options(cls: type, extra: dict, target: str):
    """`cls(**extra)` with every value converted to its field's type; unknown names are one error listing the known."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(extra) - set(known))
    if unknown:
        raise ConfigError(f"{target}: unknown option(s) {', '.join(unknown)} (known: {', '.join(known) or 'none'})")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _convert(v, hints[k], f"{target} option {k}") for k, v in extra.items()})


def check_choice(target: str, key: str, value, supported: tuple) -> None:
    if value not in supported:
        raise ConfigError(f"{target}: {key} {value!r} is not supported (supported: {', '.join(map(str, supported))})")


def float_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of `module`'s structure that shares its float32 parameters and buffers.

    Quantizers and reference transforms swap submodules and parameters of the copy (and load with
    assign=True), never writing into a tensor, so the original stays intact without a second copy of its
    weights (7 GB for a 1.7B model in float32)."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers()) if t.dtype == torch.float32}
    return copy.deepcopy(module, shared).float()


class VisionEncoder(torch.nn.Module):
    """(1, 3, S, S) normalised pixels → (1, N, H): the model's own image path (`MobileVLM.encode_images`,
    the same code, not a copy of it) over the vision tower and LDPv2 projector it is given."""

    project = MobileVLM.project
    forward = MobileVLM.encode_images

    def __init__(self, model: MobileVLM):
        super().__init__()
        self.vision_tower = model.vision_tower
        self.mm_projector = model.mm_projector


def vision_encoder(model: MobileVLM) -> VisionEncoder:
    """The image encoder as a target exports it: a float32 copy (`float_copy`: the model's float32 tensors
    shared, never written) holding only the CLIP layers that run, so the unused last layer (CLIP-L's 24th) is
    neither quantized nor exported. (Both serializers already left its unused weights out of the files: the
    bundles' bytes are the same; what this saves is quantizing it.)"""
    encoder = float_copy(VisionEncoder(model)).eval()
    encoder.vision_tower.drop_unused_layers()
    return encoder


# ---- the eager reference ---------------------------------------------------------------------------
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
        if start_pos == 0 or self.cache is None:
            self.cache = DynamicCache()
        if start_pos > self.pos:
            raise ValueError(f"decode at position {start_pos}, but the cache holds {self.pos} positions")
        if start_pos < self.cache.get_seq_length():
            self.cache.crop(start_pos - self.cache.get_seq_length())  # negative: drop that many (every version)
        x = torch.from_numpy(embeds).float()[None]  # (1, T, H)
        positions = torch.arange(start_pos, start_pos + x.shape[1])[None]
        logits = self.model.run_lm(x, position_ids=positions, cache=self.cache)  # (1, T, V)
        self.pos = start_pos + x.shape[1]
        return logits[0, -1].float().numpy()  # (V,)

    def close(self) -> None:
        """Drops the KV cache; the model belongs to the caller."""
        self.cache = None
