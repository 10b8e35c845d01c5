"""The GGUF tensors as written: which ggml type each tensor gets per quantization, encoded with gguf-py.

Tensor types (what llama.cpp's converter `convert_hf_to_gguf.py` and `llama-quantize` do):
- 1-D tensors (norms, biases), the class embedding and the position table: F32 always;
- 2-D weights (token embedding included): the quant's type. A row length (input features) that is not a
  multiple of the block falls back: gguf-py's Q8_0/Q4_0 (block 32) to F16, as the converter does;
  llama-quantize's Q4_K/Q6_K (block 256) to Q5_0/Q8_0, then F16 (the 64-wide tiny student hits both);
- `output.weight` under q4_0: Q8_0 — llama-quantize gives it Q6_K, which gguf-py cannot write;
- mmproj matmul weights: the vision quant's type (F32, F16 or Q8_0); the two conv kernels (patch
  embedding, PEG) always F16: ggml's depthwise conv aborts on an F32 kernel, and llama.cpp computes the
  patch embedding in F16 whatever the stored type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, LlamaFileType
from gguf.quants import QuantError, dequantize, quantize

from alignkd.errors import ConfigError
from alignkd.model.mobilevlm import MobileVLM

from .names import lm_names, permute_qk, qk_heads, vision_names


@dataclass(frozen=True)
class GgufQuant:
    tag: str
    """llama.cpp's spelling, used in the file name."""
    weights: T
    """2-D weights as gguf-py writes them (for q4_k_m: the F32 file llama.cpp's quantizer reads)."""
    output: T
    """`output.weight` (the LM head)."""
    file_type: LlamaFileType
    vision: str
    """The mmproj's quant (VISION_QUANTS) when the `vision_quant` option is "auto"."""
    llama_ftype: int | None = None
    """When set, llama.cpp's own quantizer turns the written LM file into this llama_ftype."""


QUANTS: dict[str, GgufQuant] = {
    "fp32": GgufQuant("f32", T.F32, T.F32, LlamaFileType.ALL_F32, "fp32"),
    "fp16": GgufQuant("f16", T.F16, T.F16, LlamaFileType.MOSTLY_F16, "fp16"),
    "q8_0": GgufQuant("q8_0", T.Q8_0, T.Q8_0, LlamaFileType.MOSTLY_Q8_0, "q8_0"),
    "q4_0": GgufQuant("q4_0", T.Q4_0, T.Q8_0, LlamaFileType.MOSTLY_Q4_0, "q8_0"),
    "q4_k_m": GgufQuant("q4_k_m", T.F32, T.F32, LlamaFileType.ALL_F32, "q8_0",
                        llama_ftype=int(LlamaFileType.MOSTLY_Q4_K_M)),
}
# mmproj quant → (its matmul weights' type, its file type, llama.cpp's spelling)
VISION_QUANTS: dict[str, tuple[T, LlamaFileType, str]] = {
    "fp32": (T.F32, LlamaFileType.ALL_F32, "f32"),
    "fp16": (T.F16, LlamaFileType.MOSTLY_F16, "f16"),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0, "q8_0"),
}
ALIASES = {"f32": "fp32", "f16": "fp16"}  # llama.cpp's names for the float types
F32_ALWAYS = ("v.class_embd", "v.position_embd.weight")
F16_ALWAYS = ("v.patch_embd.weight", "mm.model.peg.0.weight")

Tensors = dict[str, tuple[np.ndarray, T]]


def resolve_quant(quant: str, table: dict = QUANTS, what: str = "quant") -> str:
    q = ALIASES.get(quant, quant)
    if q not in table:
        raise ConfigError(f"gguf: {what} {quant!r} is not supported (supported: {', '.join(table)}; "
                          f"aliases {', '.join(ALIASES)})")
    return q


def _encode(arr: np.ndarray, qtype: T) -> tuple[np.ndarray, T]:
    """float32 array → (stored data, type); a row that does not fit the block falls back to F16."""
    if qtype == T.F32:
        return np.asarray(arr, np.float32), T.F32  # no copy of an fp32 model's weights
    if qtype == T.F16:
        return arr.astype(np.float16), T.F16
    try:
        return quantize(arr.astype(np.float32, copy=False), qtype), qtype
    except QuantError:
        return arr.astype(np.float16), T.F16


def _tensor_type(name: str, arr: np.ndarray, weight_type: T, output_type: T) -> T:
    if name in F16_ALWAYS:
        return T.F16
    if arr.ndim <= 1 or name in F32_ALWAYS:
        return T.F32
    if name == "output.weight":
        return output_type
    return weight_type


def iter_lm_tensors(model: MobileVLM, quant: str) -> Iterator[tuple[str, tuple[np.ndarray, T]]]:
    """(GGUF name, (data, type)) of each LM tensor, one at a time (a 1.7B LM is 6 GB in float32)."""
    q = QUANTS[resolve_quant(quant)]
    sd = model.state_dict()
    for ours, name in lm_names(model):
        arr = sd[ours].detach().float().cpu().numpy()
        heads = qk_heads(model, name)
        if heads is not None:
            arr = permute_qk(arr, heads)
        yield name, _encode(arr, _tensor_type(name, arr, q.weights, q.output))


def lm_tensors(model: MobileVLM, quant: str) -> Tensors:
    return dict(iter_lm_tensors(model, quant))


def mmproj_tensors(model: MobileVLM, vision_quant: str) -> Tensors:
    qtype = VISION_QUANTS[resolve_quant(vision_quant, VISION_QUANTS, "vision_quant")][0]
    sd = model.state_dict()
    out: Tensors = {}
    for ours, name in vision_names(model):
        arr = sd[ours].detach().float().cpu().numpy()
        out[name] = _encode(arr, _tensor_type(name, arr, qtype, qtype))
    return out


def dequantized(data: np.ndarray, qtype: T) -> np.ndarray:
    """One stored tensor as float32 (F32 data as it is: no copy of an fp32 model's weights)."""
    return np.asarray(data, np.float32) if qtype == T.F32 else dequantize(data, qtype).astype(np.float32)


def read_gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, de-quantized to float32 in numpy's (PyTorch's) shape order, in memory
    (not views of the file's memory map)."""
    return {t.name: np.array(dequantized(np.asarray(t.data), t.tensor_type)) for t in GGUFReader(path).tensors}
