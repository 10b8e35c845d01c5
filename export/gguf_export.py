"""GGUF target (llama.cpp): the LM as a `llama` GGUF, the vision tower + LDPv2 projector as an `mmproj` GGUF.

Files, for quant q: `model-<q>.gguf` (LLaMA, the student's SentencePiece vocabulary) and `mmproj-<q>.gguf`
(arch `clip`, projector `ldpv2`), both written with the PyPI `gguf` package; `q4_k_m` re-quantizes an F32 LM
file with llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`). <q> is llama.cpp's spelling (f32,
f16, q8_0, q4_0, q4_k_m); options.quant also takes fp32 / fp16. Runtime: llama-cpp-python, the image
through its multimodal library (mtmd), an F32 KV cache so that logits can be compared tightly.

Tensor types (what llama.cpp's converter `convert_hf_to_gguf.py` and `llama-quantize` do):
- 1-D tensors (norms, biases), the class embedding and the position table: F32 always;
- 2-D weights (token embedding included): the quant's type. A row length (input features) that is not a
  multiple of the block falls back: gguf-py's Q8_0/Q4_0 (block 32) to F16, as the converter does;
  llama-quantize's Q4_K/Q6_K (block 256) to Q5_0/Q8_0, then F16 (the 64-wide tiny student hits both);
- `output.weight` under q4_0: Q8_0 — llama-quantize gives it Q6_K, which gguf-py cannot write;
- mmproj: F32 (fp32), F16 (fp16), Q8_0 (every quantized variant: the vision tower is kept at 8 bits);
  the two conv kernels (patch embedding, PEG) always F16: ggml's depthwise conv aborts on an F32 kernel,
  and llama.cpp computes the patch embedding in F16 whatever the stored type (measured).

THE KNOWN UPSTREAM FAULT (llama.cpp issue #25814): llama.cpp's CLIP graph appends the class token after
the 576 patches, adds the position table in that order and keeps rows 1..576, so patch 0 is lost, the class
token becomes the last image feature and the grid shifts by one. No file content undoes it. The parity gate
therefore compares against `reference()`, the eager model with llama.cpp's semantics (and the weights as
written); `faithful_divergence` measures what the fault costs against the faithful eager model.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import QuantError, dequantize, quantize
from torch import nn

from alignkd.errors import ConfigError, DataError
from alignkd.model.mobilevlm import MobileVLM

from .base import EagerRuntime, ExportOptions, Runtime
from .parity import Thresholds, check_parity

# ---- quantization table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufQuant:
    tag: str
    """llama.cpp's spelling, used in the file names."""
    lm: T
    """LM 2-D weights as gguf-py writes them (for q4_k_m: the F32 file llama.cpp's quantizer reads)."""
    output: T
    """`output.weight` (the LM head)."""
    vision: T
    """mmproj matmul weights."""
    file_type: LlamaFileType
    llama_ftype: int | None = None
    """When set, llama.cpp's own quantizer turns the written LM file into this llama_ftype."""


QUANTS: dict[str, GgufQuant] = {
    "fp32": GgufQuant("f32", T.F32, T.F32, T.F32, LlamaFileType.ALL_F32),
    "fp16": GgufQuant("f16", T.F16, T.F16, T.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": GgufQuant("q8_0", T.Q8_0, T.Q8_0, T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": GgufQuant("q4_0", T.Q4_0, T.Q8_0, T.Q8_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_k_m": GgufQuant("q4_k_m", T.F32, T.F32, T.Q8_0, LlamaFileType.ALL_F32, llama_ftype=int(LlamaFileType.MOSTLY_Q4_K_M)),
}
ALIASES = {"f32": "fp32", "f16": "fp16"}  # llama.cpp's names for the float files
MMPROJ_FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.Q8_0: LlamaFileType.MOSTLY_Q8_0}

# Parity against `reference()`: the eager model with llama.cpp's semantics and the de-quantized weights as
# written, so what remains is ggml's arithmetic (numbers measured on the tiny student, 16 greedy tokens).
THRESHOLDS: dict[str, Thresholds] = {
    # F32 everywhere; the reference emulates ggml's FP16-table GELUs and F16 im2col convs, so only summation
    # order differs: image cos 1 − 4e-10, logits 1.2e-6 of their range.
    "fp32": Thresholds(image_cos=0.99999, logits_rel=1e-4, top1=1.0, exact_tokens=True),
    # ggml rounds activations to F16 before F16 matmuls (~5e-4 relative each): measured 1.4e-4; real depths
    # accumulate more, and a near-tie may flip one of 16 tokens.
    "fp16": Thresholds(image_cos=0.9999, logits_rel=1e-2, top1=0.9, exact_tokens=False),
    # ggml quantizes activations to 8 bits (Q8_0 / Q8_K) against quantized weights: measured image cos
    # 0.99999, logits 2.5e-3 – 5e-3. Teacher-forced top-1 flips on near-ties below that error, which a
    # random-weight LM is full of (0.81 on a 256-wide random LM in Q4_K_M); 0.75 still catches a broken file.
    "q8_0": Thresholds(image_cos=0.999, logits_rel=3e-2, top1=0.75, exact_tokens=False),
    "q4_0": Thresholds(image_cos=0.999, logits_rel=3e-2, top1=0.75, exact_tokens=False),
    "q4_k_m": Thresholds(image_cos=0.999, logits_rel=3e-2, top1=0.75, exact_tokens=False),
}


def resolve_quant(quant: str) -> str:
    q = ALIASES.get(quant, quant)
    if q not in QUANTS:
        raise ConfigError(f"GGUF quant {quant!r} is not supported "
                          f"(supported: {', '.join(QUANTS)}; aliases {', '.join(ALIASES)})")
    return q


def file_names(quant: str) -> tuple[str, str]:
    tag = QUANTS[resolve_quant(quant)].tag
    return f"model-{tag}.gguf", f"mmproj-{tag}.gguf"


def artifact_files(out_dir: Path, quant: str) -> tuple[Path, Path]:
    lm_file, mm_file = (Path(out_dir) / n for n in file_names(quant))
    for f in (lm_file, mm_file):
        if not f.is_file():
            raise DataError(f"{f} not found: export with quant {quant!r} first")
    return lm_file, mm_file


# ---- name tables: ours (MobileVLM state dict) ↔ GGUF ------------------------------------------------

LM_GLOBAL_NAMES: tuple[tuple[str, str], ...] = (
    ("lm.model.embed_tokens.weight", "token_embd.weight"),
    ("lm.model.norm.weight", "output_norm.weight"),
    ("lm.lm_head.weight", "output.weight"),
)
LM_LAYER_NAMES: tuple[tuple[str, str], ...] = (  # under lm.model.layers.{i}. ↔ blk.{i}.
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
)
_CLIP = "vision_tower.vision_tower."
VISION_GLOBAL_NAMES: tuple[tuple[str, str], ...] = (
    (_CLIP + "embeddings.patch_embedding.weight", "v.patch_embd.weight"),
    (_CLIP + "embeddings.class_embedding", "v.class_embd"),
    (_CLIP + "embeddings.position_embedding.weight", "v.position_embd.weight"),
    (_CLIP + "pre_layrnorm.weight", "v.pre_ln.weight"),
    (_CLIP + "pre_layrnorm.bias", "v.pre_ln.bias"),
    ("mm_projector.mlp.mlp.0.weight", "mm.model.mlp.0.weight"),
    ("mm_projector.mlp.mlp.0.bias", "mm.model.mlp.0.bias"),
    ("mm_projector.mlp.mlp.2.weight", "mm.model.mlp.2.weight"),
    ("mm_projector.mlp.mlp.2.bias", "mm.model.mlp.2.bias"),
    ("mm_projector.peg.peg.0.weight", "mm.model.peg.0.weight"),
    ("mm_projector.peg.peg.0.bias", "mm.model.peg.0.bias"),
)
VISION_LAYER_NAMES: tuple[tuple[str, str], ...] = tuple(  # under ...encoder.layers.{i}. ↔ v.blk.{i}.
    (f"{ours}.{p}", f"{theirs}.{p}")
    for ours, theirs in (
        ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
        ("self_attn.out_proj", "attn_out"), ("layer_norm1", "ln1"), ("layer_norm2", "ln2"),
        ("mlp.fc1", "ffn_up"), ("mlp.fc2", "ffn_down"),
    )
    for p in ("weight", "bias")
)
# Tensors whose type does not follow the quant (see the module docstring).
F32_ALWAYS = ("v.class_embd", "v.position_embd.weight")
F16_ALWAYS = ("v.patch_embd.weight", "mm.model.peg.0.weight")
LLAMACPP_GRID = 24  # llama.cpp's ldpv2 graph hard-codes a 24×24 patch grid pooled 2×2 to 12×12


def lm_names(model: MobileVLM) -> list[tuple[str, str]]:
    rows = [r for r in LM_GLOBAL_NAMES if not (r[1] == "output.weight" and model.config.text.tie_word_embeddings)]
    for i in range(model.config.text.num_layers):
        rows += [(f"lm.model.layers.{i}.{a}", f"blk.{i}.{b}") for a, b in LM_LAYER_NAMES]
    return rows


def vision_layers_run(model: MobileVLM) -> int:
    """ViT layers whose output feeds the projector (hidden_states[select_layer])."""
    v = model.config.vision
    n = v.select_layer if v.select_layer >= 0 else v.num_layers + 1 + v.select_layer
    if not 1 <= n <= v.num_layers - 1:
        # llama.cpp runs block_count − 1 layers: reaching layer n needs n + 1 stored blocks
        raise ConfigError(f"mm_vision_select_layer {v.select_layer} cannot be expressed in an mmproj GGUF "
                          f"(llama.cpp stops one layer before the last stored block)")
    return n


def vision_names(model: MobileVLM) -> list[tuple[str, str]]:
    rows = list(VISION_GLOBAL_NAMES)
    for i in range(vision_layers_run(model) + 1):
        rows += [(f"{_CLIP}encoder.layers.{i}.{a}", f"v.blk.{i}.{b}") for a, b in VISION_LAYER_NAMES]
    return rows


# ---- tensors ---------------------------------------------------------------------------------------


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows → llama.cpp's interleaved rope layout (what convert_hf_to_gguf does)."""
    d = w.shape[0]
    return w.reshape(n_head, 2, d // n_head // 2, -1).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    d = w.shape[0]
    return w.reshape(n_head, d // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


ROPE_PERMUTED = {"attn_q.weight": "num_heads", "attn_k.weight": "num_kv_heads"}  # blk.{i}.<name> → its head count


def _qk_heads(model: MobileVLM, gguf_name: str) -> int | None:
    """The head count to permute a q/k weight with, None for every other tensor."""
    field = ROPE_PERMUTED.get(gguf_name.split(".", 2)[-1]) if gguf_name.startswith("blk.") else None
    return getattr(model.config.text, field) if field else None


def _encode(arr: np.ndarray, qtype: T) -> tuple[np.ndarray, T]:
    """float32 array → (stored data, type); a row that does not fit the block falls back to F16."""
    if qtype == T.F32:
        return arr.astype(np.float32), T.F32
    if qtype == T.F16:
        return arr.astype(np.float16), T.F16
    try:
        return quantize(arr.astype(np.float32), qtype), qtype
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


Tensors = dict[str, tuple[np.ndarray, T]]


def lm_tensors(model: MobileVLM, quant: str) -> Tensors:
    q = QUANTS[resolve_quant(quant)]
    sd = model.state_dict()
    out: Tensors = {}
    for ours, name in lm_names(model):
        arr = sd[ours].detach().float().cpu().numpy()
        heads = _qk_heads(model, name)
        if heads is not None:
            arr = permute_qk(arr, heads)
        out[name] = _encode(arr, _tensor_type(name, arr, q.lm, q.output))
    return out


def mmproj_tensors(model: MobileVLM, quant: str) -> Tensors:
    q = QUANTS[resolve_quant(quant)]
    sd = model.state_dict()
    out: Tensors = {}
    for ours, name in vision_names(model):
        arr = sd[ours].detach().float().cpu().numpy()
        out[name] = _encode(arr, _tensor_type(name, arr, q.vision, q.vision))
    return out


def dequantized(tensors: Tensors) -> dict[str, np.ndarray]:
    return {name: dequantize(data, qtype).astype(np.float32) for name, (data, qtype) in tensors.items()}


def _dequantize(t) -> np.ndarray:
    return dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)


def read_gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, de-quantized to float32 in numpy's (PyTorch's) shape order."""
    return {t.name: _dequantize(t) for t in GGUFReader(path).tensors}


# ---- writing -----------------------------------------------------------------------------------------


def _tokenizer_model_path(tokenizer) -> Path:
    """The SentencePiece `tokenizer.model` behind a loaded tokenizer (or a path to it / its folder)."""
    cands = []
    if isinstance(tokenizer, (str, Path)):
        cands.append(Path(tokenizer))
    else:
        for attr in ("vocab_file", "name_or_path"):
            if getattr(tokenizer, attr, None):
                cands.append(Path(getattr(tokenizer, attr)))
    for c in cands:
        for f in (c, c / "tokenizer.model"):
            if f.is_file() and f.name.endswith(".model"):
                return f
    raise ConfigError("the GGUF export needs the tokenizer's SentencePiece tokenizer.model "
                      f"(looked in: {', '.join(map(str, cands)) or 'nothing given'})")


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool
    unk_id: int = 0


def placeholder_vocab(vocab_size: int) -> Vocab:
    """A vocabulary of the right size for files only llama.cpp's quantizer reads (it ignores the pieces)."""
    return Vocab([f"<t{i}>" for i in range(vocab_size)], [0.0] * vocab_size, [int(TokenType.NORMAL)] * vocab_size, True)


def sentencepiece_vocab(model_file: Path, vocab_size: int) -> Vocab:
    """Pieces, scores and token types as llama.cpp's converter reads them, padded to vocab_size."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.vocab_size()
    if n > vocab_size:
        raise ConfigError(f"tokenizer {model_file} has {n} pieces but the model's vocab_size is {vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        kind = (TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                else TokenType.BYTE if sp.is_byte(i) else TokenType.UNUSED if sp.is_unused(i) else TokenType.NORMAL)
        types.append(int(kind))
    for i in range(n, vocab_size):  # embedding rows beyond the tokenizer: unused pieces, as the converter pads
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return Vocab(tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix), max(sp.unk_id(), 0))


def _write(writer: GGUFWriter, tensors: Tensors) -> None:
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_lm(path: Path, model: MobileVLM, vocab: Vocab, context: int, tensors: Tensors, file_type: int) -> None:
    t = model.config.text
    w = GGUFWriter(path, "llama")
    w.add_name(f"alignkd {model.config.name}")
    w.add_file_type(file_type)
    w.add_context_length(context)
    w.add_embedding_length(t.hidden_size)
    w.add_block_count(t.num_layers)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_heads)
    w.add_head_count_kv(t.num_kv_heads)
    w.add_rope_dimension_count(t.head_dim)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_rope_freq_base(t.rope_theta)
    w.add_vocab_size(t.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(t.bos_token_id)
    w.add_eos_token_id(t.eos_token_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_pad_token_id(t.pad_token_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)
    _write(w, tensors)


def write_mmproj(path: Path, model: MobileVLM, tensors: Tensors, file_type: int) -> None:
    v = model.config.vision
    if v.grid != LLAMACPP_GRID or model.config.pooled_grid != LLAMACPP_GRID // 2:
        g = LLAMACPP_GRID
        raise ConfigError(f"llama.cpp's ldpv2 projector needs a {g}×{g} patch grid pooled to {g // 2}×{g // 2}; "
                          f"this model has {v.grid}×{v.grid} → {model.config.pooled_grid}×{model.config.pooled_grid}")
    gelu = {"quick_gelu": False, "gelu": True}.get(v.hidden_act)
    if gelu is None:
        raise ConfigError(f"vision hidden_act {v.hidden_act!r} has no llama.cpp CLIP equivalent (quick_gelu or gelu)")
    w = GGUFWriter(path, "clip")
    w.add_name(f"alignkd {model.config.name} mmproj")
    w.add_file_type(file_type)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "ldpv2")
    w.add_bool("clip.use_gelu", gelu)
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    w.add_uint32("clip.vision.projection_dim", v.projection_dim)
    w.add_uint32("clip.vision.block_count", vision_layers_run(model) + 1)  # the graph runs block_count − 1
    w.add_uint32("clip.vision.attention.head_count", v.num_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v.layer_norm_eps)
    w.add_array("clip.vision.image_mean", list(v.image_mean))
    w.add_array("clip.vision.image_std", list(v.image_std))
    _write(w, tensors)


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp failed to quantize {src} to ftype {ftype}")


# ---- the llama.cpp-semantics eager reference ----------------------------------------------------------


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().to(x.dtype)


class TableActivation(nn.Module):
    """ggml's CPU GELU / quick-GELU read an FP16 table: input and output rounded to FP16 (GELU is taken
    exactly as 0 / x outside ±10; quick-GELU has no such clamp)."""

    def __init__(self, fn, clamp: bool):
        super().__init__()
        self.fn, self.clamp = fn, clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _f16(self.fn(_f16(x)))
        if self.clamp:
            y = torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))
        return y


class F16Im2col(nn.Module):
    """ggml runs a conv with an F16 kernel as im2col in F16: the input is rounded to F16 first."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_f16(x))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")  # ggml_gelu is the tanh approximation


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _table_gelu() -> TableActivation:
    return TableActivation(_gelu_tanh, clamp=True)


VIT_ACTIVATIONS = {  # clip.use_gelu False / True
    "quick_gelu": lambda: TableActivation(_quick_gelu, clamp=False),
    "gelu": _table_gelu,
}


def llamacpp_image_features(clip: nn.Module, pixels: torch.Tensor, n_layers: int) -> torch.Tensor:
    """(B, 3, S, S) → (B, P, D): what llama.cpp's CLIP graph hands the projector (issue #25814).

    The class token is appended after the P patches and the position table added in that order
    (patch i gets position i, the class token position P); after n_layers layers rows 1..P are kept:
    patch 0 is dropped and the class token is the last feature.
    """
    emb = clip.embeddings
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, P, D)
    cls = emb.class_embedding.expand(patches.shape[0], 1, -1)  # (B, 1, D)
    x = torch.cat([patches, cls], 1) + emb.position_embedding.weight[None]  # (B, P+1, D)
    x = clip.pre_layrnorm(x)
    for layer in clip.encoder.layers[:n_layers]:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    return x[:, 1:]  # (B, P, D)


def _load_gguf_weights(m: MobileVLM, lm: dict[str, np.ndarray], mm: dict[str, np.ndarray]) -> None:
    """Put the (de-quantized) tensors of a GGUF pair into `m` (float32), undoing the q/k permutation."""
    sd = m.state_dict()
    for ours, name in lm_names(m):
        heads = _qk_heads(m, name)
        arr = unpermute_qk(lm[name], heads) if heads is not None else lm[name]
        sd[ours] = torch.from_numpy(arr).reshape(sd[ours].shape)
    if m.config.text.tie_word_embeddings:
        sd["lm.lm_head.weight"] = sd["lm.model.embed_tokens.weight"]
    for ours, name in vision_names(m):
        sd[ours] = torch.from_numpy(mm[name]).reshape(sd[ours].shape)
    m.load_state_dict(sd)


def llamacpp_model(model: MobileVLM, lm: dict[str, np.ndarray] | None = None,
                   mm: dict[str, np.ndarray] | None = None) -> MobileVLM:
    """A float32 copy of `model` computing as ggml does on CPU — table activations, tanh GELU in the
    projector, F16 im2col for the two convs (whose kernels the mmproj stores F16) — carrying the weights of
    a GGUF pair when given. One copy: a 1.7B student is 7 GB in float32."""
    m = copy.deepcopy(model).float().eval()
    if lm is not None and mm is not None:
        _load_gguf_weights(m, lm, mm)
    clip = m.vision_tower.vision_tower
    for layer in clip.encoder.layers:
        layer.mlp.activation_fn = VIT_ACTIVATIONS[model.config.vision.hidden_act]()
    clip.embeddings.patch_embedding = F16Im2col(clip.embeddings.patch_embedding)
    m.mm_projector.mlp.mlp[1] = _table_gelu()
    m.mm_projector.peg.peg[0] = F16Im2col(m.mm_projector.peg.peg[0])
    return m


class LlamaCppReferenceRuntime(EagerRuntime):
    """`Runtime` over a `llamacpp_model`: the class-token fault and ggml's activations in the image path,
    the LM as in eager."""

    def __init__(self, model: MobileVLM):
        super().__init__(model)
        self.n_layers = vision_layers_run(model)

    @torch.no_grad()
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        v = self.model.config.vision
        # llama.cpp sees the uint8 bitmap: the reference sees the same pixels
        px = torch.from_numpy(normalise(to_uint8_image(pixels, v.image_mean, v.image_std), v.image_mean, v.image_std))[None]
        feats = llamacpp_image_features(self.model.vision_tower.vision_tower, px, self.n_layers)  # (1, P, Dv)
        return self.model.project(feats)[0].numpy()  # (N, H)


# ---- the runtime ----------------------------------------------------------------------------------------


def to_uint8_image(pixels: np.ndarray, mean, std) -> np.ndarray:
    """(1, 3, S, S) normalised pixels → (S, S, 3) uint8 RGB, the bitmap they were made from (exact for
    pixels from alignkd.data.image.preprocess; other values are rounded and clipped to 0..255)."""
    if pixels.ndim != 4 or pixels.shape[:2] != (1, 3):
        raise DataError(f"expected pixels of shape (1, 3, S, S), got {tuple(pixels.shape)}")
    m = np.asarray(mean, np.float64)[:, None, None]
    s = np.asarray(std, np.float64)[:, None, None]
    rgb = (pixels[0].astype(np.float64) * s + m) * 255.0  # (3, S, S)
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(1, 2, 0))  # (S, S, 3)


def normalise(image: np.ndarray, mean, std) -> np.ndarray:
    """(S, S, 3) uint8 → (3, S, S) float32, the arithmetic of alignkd.data.image.preprocess."""
    x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@contextlib.contextmanager
def model_params(**fields):
    """Set fields of llama.cpp's `llama_model_params` that llama-cpp-python's `Llama()` does not take, for
    the models loaded inside the block.

    use_extra_bufts=False: llama.cpp's extra CPU buffer types (AMX tiles, repacked Q4_0/Q8_0 weights) make
    llama_decode segfault on quantized models of the tiny presets' width on AMX-capable Xeons."""
    import llama_cpp.llama_cpp as lc

    default = lc.llama_model_default_params

    def patched():
        p = default()
        for k, v in fields.items():
            setattr(p, k, v)
        return p

    lc.llama_model_default_params = patched
    try:
        yield
    finally:
        lc.llama_model_default_params = default


class GgufRuntime:
    """A GGUF pair in llama-cpp-python: LM through llama_decode on embeddings, image through mtmd."""

    def __init__(self, model_path: Path, mmproj_path: Path, threads: int = 2):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp._logger import llama_log_callback

        self._llama_cpp, self._mtmd = llama_cpp, mtmd
        meta = GGUFReader(mmproj_path).fields
        self.mean = np.asarray(meta["clip.vision.image_mean"].contents(), np.float64)
        self.std = np.asarray(meta["clip.vision.image_std"].contents(), np.float64)
        lm = GGUFReader(model_path)
        self.n_ctx = int(lm.fields["llama.context_length"].contents())
        # token rows de-quantized exactly as llama.cpp's get_rows reads them
        self.token_embd = next(_dequantize(t) for t in lm.tensors if t.name == "token_embd.weight")  # (V, H)
        del lm
        # F32 KV cache: the default F16 cache alone costs ~1e-2 in the logits. One batch holds a whole prompt.
        with model_params(use_extra_bufts=False):
            self.llm = llama_cpp.Llama(str(model_path), n_ctx=self.n_ctx, n_batch=self.n_ctx,
                                       n_ubatch=min(self.n_ctx, 512), n_threads=threads, n_threads_batch=threads,
                                       type_k=0, type_v=0, verbose=False)
        mtmd.mtmd_log_set(llama_log_callback, ctypes.c_void_p(0))  # quiet unless llama-cpp-python is verbose
        mtmd.mtmd_helper_log_set(llama_log_callback, ctypes.c_void_p(0))
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.warmup = False
        params.n_threads = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.mtmd_ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
        if not self.mtmd_ctx:
            raise RuntimeError(f"llama.cpp could not load the mmproj {mmproj_path}")
        self.llm._stack.callback(self._free_mtmd)
        self.n_embd = self.llm.n_embd()
        self.n_vocab = self.llm.n_vocab()
        self.pos = 0

    def _free_mtmd(self) -> None:
        if self.mtmd_ctx:
            self._mtmd.mtmd_free(self.mtmd_ctx)
            self.mtmd_ctx = None

    def close(self) -> None:
        self.llm.close()

    # -- image --------------------------------------------------------------------------------------
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """De-normalise to the uint8 bitmap; mtmd resizes (identity at image_size), normalises, encodes."""
        return self.encode_bitmap(to_uint8_image(np.asarray(pixels), self.mean, self.std))

    def encode_bitmap(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB → (N, H) image tokens, llama.cpp's preprocessing included."""
        mtmd = self._mtmd
        chunks = self._tokenize_media(mtmd.mtmd_default_marker(), image)
        try:
            chunk = self._image_chunk(chunks)
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_encode_chunk(self.mtmd_ctx, chunk) != 0:
                raise RuntimeError("mtmd failed to encode the image")
            out = mtmd.mtmd_get_output_embd(self.mtmd_ctx)
            return np.ctypeslib.as_array(out, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()  # (N, H)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def _tokenize_media(self, text: bytes, image: np.ndarray, add_special: bool = False):
        mtmd = self._mtmd
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape}")
        data = image.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = mtmd.mtmd_bitmap_init(image.shape[1], image.shape[0], data)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            inp = mtmd.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), add_special, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self.mtmd_ctx, chunks, ctypes.byref(inp), bitmaps, 1) != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                raise RuntimeError("mtmd failed to tokenize the prompt and image")
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        return chunks

    def _image_chunk(self, chunks):
        mtmd = self._mtmd
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                return chunk
        raise RuntimeError("mtmd produced no image chunk")

    # -- text -----------------------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.token_embd[np.asarray(ids, dtype=np.int64)]  # (T, H)

    def decode(self, embeds: np.ndarray, start_pos: int) -> np.ndarray:
        lc = self._llama_cpp
        mem = lc.llama_get_memory(self.llm.ctx)
        if start_pos == 0:
            lc.llama_memory_clear(mem, True)
        elif start_pos != self.pos:
            raise ValueError(f"decode at position {start_pos}, but the cache holds {self.pos} positions")
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)  # (T, H)
        n = embeds.shape[0]
        if start_pos + n > self.n_ctx:
            raise DataError(f"{start_pos + n} positions exceed the GGUF context of {self.n_ctx}")
        batch = lc.llama_batch_init(n, self.n_embd, 1)
        try:
            batch.n_tokens = n
            ctypes.memmove(batch.embd, embeds.ctypes.data, embeds.nbytes)
            for i in range(n):
                batch.pos[i] = start_pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n - 1
            if lc.llama_decode(self.llm.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        finally:
            lc.llama_batch_free(batch)
        self.pos = start_pos + n
        return self._last_logits()

    def _last_logits(self) -> np.ndarray:
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()  # (V,)

    # -- llama.cpp end to end -----------------------------------------------------------------------
    def generate_native(self, prompt: str, image: np.ndarray, max_new_tokens: int, eos_id: int) -> list[int]:
        """Greedy decoding entirely inside llama.cpp: its tokenizer splits `prompt` around the `<image>`
        marker, mtmd preprocesses and encodes `image` ((H, W, 3) uint8) and evaluates the chunks, then tokens
        are fed as ids (llama.cpp's own embedding lookup)."""
        from alignkd.data.templates import IMAGE_TOKEN

        lc, mtmd = self._llama_cpp, self._mtmd
        text = prompt.replace(IMAGE_TOKEN, mtmd.mtmd_default_marker().decode()).encode()
        lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)
        chunks = self._tokenize_media(text, image, add_special=True)
        try:
            n_past = lc.llama_pos(0)
            if mtmd.mtmd_helper_eval_chunks(self.mtmd_ctx, self.llm.ctx, chunks, 0, 0, self.llm.n_batch, True,
                                            ctypes.byref(n_past)) != 0:
                raise RuntimeError("mtmd failed to evaluate the prompt")
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        pos, tokens = n_past.value, []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(self._last_logits()))
            if tok == eos_id:
                break
            tokens.append(tok)
            if len(tokens) == max_new_tokens:
                break
            ids, positions = (lc.llama_token * 1)(tok), (lc.llama_pos * 1)(pos)  # kept alive across the call
            batch = lc.llama_batch_get_one(ids, 1)
            batch.pos = positions
            if lc.llama_decode(self.llm.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            pos += 1
        self.pos = pos
        return tokens


# ---- llama-cpp-python's chat API ------------------------------------------------------------------------

# MobileVLM's `v1` conversation ("{system} USER: <image>\n{question} ASSISTANT:", turns ended by " " and
# "</s>"), which Llava15ChatHandler's template does not produce. The image URL is replaced by mtmd's marker.
V1_CHAT_FORMAT = (
    "{% for message in messages %}"
    "{% if message.role == 'system' %}{{ message.content }} {% endif %}"
    "{% if message.role == 'user' %}USER: "
    "{% if message.content is string %}{{ message.content }}{% else %}"
    "{% for c in message.content %}{% if c.type == 'image_url' %}"
    "{{ c.image_url.url if c.image_url is mapping else c.image_url }}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% for c in message.content %}{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}"
    "{% endif %} {% endif %}"
    "{% if message.role == 'assistant' and message.content is not none %}ASSISTANT: {{ message.content }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def mobilevlm_chat_handler(mmproj_path: Path, verbose: bool = False):
    """A llama-cpp-python chat handler speaking MobileVLM's `v1` template: pass it as
    `Llama(model_path, chat_handler=...)` and call `create_chat_completion` with an image_url + text."""
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from alignkd.data.templates import V1_SYSTEM

    class MobileVLMChatHandler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = V1_SYSTEM
        CHAT_FORMAT = V1_CHAT_FORMAT

    return MobileVLMChatHandler(clip_model_path=str(mmproj_path), verbose=verbose)


def chat_v1(out_dir: Path, question: str, image: np.ndarray, options: ExportOptions, max_new_tokens: int = 64) -> str:
    """Answer `question` about `image` ((H, W, 3) uint8 RGB) through llama-cpp-python's own chat API with
    MobileVLM's `v1` prompt, greedy: the path a user of the GGUF pair takes."""
    import llama_cpp

    lm_file, mm_file = artifact_files(out_dir, options.quant)
    llm = llama_cpp.Llama(str(lm_file), n_ctx=0, n_threads=options.threads, n_threads_batch=options.threads,
                          type_k=0, type_v=0, verbose=False, chat_handler=mobilevlm_chat_handler(mm_file))
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_uri(image)}},
                                                   {"type": "text", "text": question}]}],
            temperature=0.0, repeat_penalty=1.0, max_tokens=max_new_tokens)
    finally:
        llm.close()
    return out["choices"][0]["message"]["content"]


def image_data_uri(image: np.ndarray) -> str:
    """(H, W, 3) uint8 RGB → a PNG data URI, the image form llama-cpp-python's chat API takes."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---- the target -----------------------------------------------------------------------------------------


def faithful_divergence(model: MobileVLM, runtime: Runtime, prompt_ids: list[int], pixels: np.ndarray,
                        n_tokens: int = 16) -> dict:
    """What llama.cpp's class-token fault (and its arithmetic) costs against the faithful eager model:
    image-token cosine / max-abs, prompt-logit error, greedy tokens of both and teacher-forced top-1."""
    report = check_parity(runtime, EagerRuntime(model), prompt_ids, pixels,
                          Thresholds(image_cos=-1.0, logits_rel=float("inf"), top1=0.0, exact_tokens=False), n_tokens)
    for k in ("thresholds", "failures", "passed"):
        report.pop(k)
    return report


def parity_report(model: MobileVLM, out_dir: Path, options: ExportOptions, prompt_ids: list[int],
                  pixels: np.ndarray, n_tokens: int = 16) -> dict:
    """The gate for an exported pair (against `reference()`, THRESHOLDS[quant]) plus, for users, what the
    upstream fault costs against the faithful model (`faithful_divergence`)."""
    target = GgufTarget()
    runtime = target.load(out_dir, options)
    try:
        report = check_parity(runtime, target.reference(model, options), prompt_ids, pixels,
                              THRESHOLDS[resolve_quant(options.quant)], n_tokens)
        report["faithful_divergence"] = faithful_divergence(model, runtime, prompt_ids, pixels, n_tokens)
    finally:
        runtime.close()
    report["reference"] = "eager model with llama.cpp's CLIP semantics (llama.cpp issue #25814), weights as stored"
    return report


@dataclass
class GgufTarget:
    """`ExportTarget` for llama.cpp. Reads options.quant, max_seq_len (the GGUF context), threads."""

    name: str = "gguf"
    quants: tuple[str, ...] = tuple(QUANTS)
    """Also accepted: llama.cpp's spellings "f32" / "f16" (ALIASES)."""
    default_group_size: int = 32
    """Fixed by the format (Q4_0 / Q8_0 blocks of 32); ExportOptions.group_size is not read."""

    def export(self, model: MobileVLM, tokenizer, out_dir: Path, options: ExportOptions) -> list[Path]:
        quant = resolve_quant(options.quant)
        q = QUANTS[quant]
        out_dir = Path(out_dir)
        lm_file, mm_file = (out_dir / n for n in file_names(quant))
        model = model.eval()
        context = options.max_seq_len or model.config.text.max_position_embeddings
        vocab = sentencepiece_vocab(_tokenizer_model_path(tokenizer), model.config.text.vocab_size)
        write_mmproj(mm_file, model, mmproj_tensors(model, quant), int(MMPROJ_FILE_TYPES[q.vision]))
        if q.llama_ftype is None:
            write_lm(lm_file, model, vocab, context, lm_tensors(model, quant), int(q.file_type))
        else:
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                src = Path(tmp) / "model-f32.gguf"
                write_lm(src, model, vocab, context, lm_tensors(model, quant), int(q.file_type))
                llama_quantize(src, lm_file, q.llama_ftype, options.threads)
        return [lm_file, mm_file]

    def load(self, out_dir: Path, options: ExportOptions) -> GgufRuntime:
        return GgufRuntime(*artifact_files(out_dir, options.quant), threads=options.threads)

    def reference(self, model: MobileVLM, options: ExportOptions) -> LlamaCppReferenceRuntime:
        """The eager model with llama.cpp's semantics, carrying the weights exactly as the GGUFs store them."""
        quant = resolve_quant(options.quant)
        q = QUANTS[quant]
        mm = dequantized(mmproj_tensors(model, quant))
        if q.llama_ftype is None:
            lm = dequantized(lm_tensors(model, quant))
        else:  # the K-quant mix is llama.cpp's: quantize a temporary file and read it back
            with tempfile.TemporaryDirectory() as tmp:
                src, dst = Path(tmp) / "f32.gguf", Path(tmp) / "q.gguf"
                t = model.config.text
                write_lm(src, model, placeholder_vocab(t.vocab_size), t.max_position_embeddings, lm_tensors(model, quant),
                         int(q.file_type))
                llama_quantize(src, dst, q.llama_ftype, options.threads)
                lm = read_gguf_tensors(dst)
        return LlamaCppReferenceRuntime(llamacpp_model(model, lm, mm))
