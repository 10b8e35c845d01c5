"""Writing the GGUF pair with gguf-py: the `llama` LM file (with the SentencePiece vocabulary) and the `clip`
mmproj (projector `ldpv2`); K-quants through llama.cpp's own quantizer."""

from __future__ import annotations

import ctypes
import errno
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFWriter, TokenType

from alignkd.errors import ConfigError
from alignkd.fileio import DiskFull, writing
from alignkd.model.mobilevlm import MobileVLM

from .names import LLAMACPP_GRID, vision_layers_run
from .tensors import Tensors

# numpy's `tofile` (gguf-py's tensor writer) reports a short write on a full disk as
# "OSError: N requested and M written", without an errno
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def tokenizer_model_path(tokenizer) -> Path:
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
def _write(path: Path, writer: GGUFWriter, tensors: Tensors) -> None:
    """Header, metadata and tensors; a full disk is one `DiskFull` naming `path`."""
    with writing(path):
        try:
            for name, (data, qtype) in tensors.items():
                writer.add_tensor(name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        except OSError as e:
            if e.errno is None and _SHORT_WRITE.search(str(e)):
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise
        finally:
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
    _write(path, w, tensors)


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
    _write(path, w, tensors)


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        if shutil.disk_usage(dst.parent).free < src.stat().st_size // 2:  # llama.cpp returns no reason
            raise DiskFull(f"disk full while writing {dst}: no space left on device")
        raise RuntimeError(f"llama.cpp failed to quantize {src} to ftype {ftype}")


