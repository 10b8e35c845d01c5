"""ExecuTorch target ("pte"): one multi-method `model.pte` in the contract of ExecuTorch's LLaVA example.

Methods (batch 1):
- `vision_encoder`: (1, 3, S, S) float normalised pixels → (1, 144, H) image tokens. Normalisation stays
  outside, in our preprocessing (`alignkd.data.image.preprocess`), as for every other target.
- `token_embedding`: (1, T) int64 ids → (1, T, H), T dynamic in 1..max_seq_len.
- `text_decoder`: (1, T, H) embeddings + (1,) int64 start position → (1, V) logits of the LAST position
  only (what decoding needs; all-position logits would cost T×V of memory per prefill). The KV cache is a
  static (1, max_seq_len, heads, head_dim) buffer per layer inside the program's mutable state; T is
  dynamic, so the prompt prefills in one call. Start position 0 starts a new sequence: the causal SDPA op
  attends only to positions < start + T, so stale cache rows are never read.
- constant methods: `get_max_seq_len`, `get_max_context_len`, `get_bos_id`, `get_eos_ids`,
  `get_vocab_size`, `use_kv_cache`, `enable_dynamic_shape`, `use_sdpa_with_kv_cache` (the keys
  ExecuTorch's C++ multimodal runner reads).

The text decoder is ExecuTorch's own LLaMA `Transformer` (`executorch.examples.models.llama`) with the
source transforms of its LLM exporter: `CustomKVCache` (`llama::update_cache`) and `SDPACustom`
(`llama::custom_sdpa`, causal from the start position), HF-layout RoPE, weights copied from `model.lm`
through `NAME_TABLE`: the path that decodes as fast as llama.cpp, where a transformers static-cache export
is far slower (DESIGN.md §3, README Results).

Quantization (ExportOptions.quant; `QUANTS`):
- `fp32`: no quantization.
- `8da4w`: torchao `Int8DynamicActivationIntxWeightConfig` — int8 per-token dynamic activations, int4
  weights in groups of `group_size` (HQQ scales, as ExecuTorch's exporter); lowered to XNNPACK's
  qd8-f32-qb4w kernels. Linears whose input width is not a multiple of `group_size` stay fp32 (same
  rule as ExecuTorch's exporter).
- `8da8w`: the same with int8 per-channel weights (fully XNNPACK-delegated int8).
- `int8`: int8 per-channel weight-only, ExecuTorch's `WeightOnlyInt8QuantHandler` (its `-qmode int8`).
  Not torchao here: in executorch 1.5.1 the XNNPACK partitioner classifies a torchao weight-only
  dequantize→linear as *static* activation quantization and the delegate returns garbage (orders of
  magnitude off), so the weights are stored int8 and the matmul runs in ExecuTorch's portable kernels.

The target's own options (`PteOptions`, from `ExportOptions.extra`):
- `group_size`: the 4-bit group of `8da4w` linears and of a 4-bit embedding table (default 32).
- `embedding_quant` "fp32"/"8"/"4": ExecuTorch's `EmbeddingQuantHandler` (torchao's `IntxWeightOnlyConfig`
  grouped by `group_size`, HQQ; 4-bit packed two per byte), run by the `quantized_decomposed` kernels.
  Default ("auto"): the LM's weight bits (8da4w → 4, 8da8w / int8 → 8, fp32 → fp32), as llama.cpp
  quantizes `token_embd` with the model.
- `vision_quant` "fp32"/"8da8w"/"8da4w": the linears of the vision tower and projector (the ViT's 303M
  parameters are 1.2 GB in fp32). Default ("auto"): fp32 for an fp32 LM, else `8da8w` — int8 per-channel weights
  and int8 per-token dynamic activations, XNNPACK's qd8-f32-qc8w GEMMs, gated on the image tokens against
  the fp32 encoder (`VISION_THRESHOLDS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from transformers import LlamaForCausalLM

from alignkd.errors import ConfigError, DataError
from alignkd.fileio import writing
from alignkd.model.mobilevlm import MobileVLM

from .base import ExportOptions, TargetBase, check_choice, float_copy, vision_encoder
from .parity import Thresholds, combine, lm_gate

log = logging.getLogger(__name__)

PTE_MAGIC = b"ET12"  # the program flatbuffer's file identifier, bytes 4-8
PTE_NAME = "model.pte"
EMBEDDING_QUANTS = ("8", "4")
VISION_QUANTS = ("fp32", "8da4w", "8da8w")

# transformers LlamaForCausalLM names → ExecuTorch llama `Transformer` names. The token embedding is not
# here: it is its own method (`token_embedding`), not part of the decoder.
NAME_TABLE: tuple[tuple[str, str], ...] = (
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
)
_NOT_IN_DECODER = ("model.embed_tokens.weight",)

# Bounds per quant against the fp32 eager model; what each was set against: docs/parity_gates.md.
# The 4-bit gate catches gross lowering faults only (a wrong layout or scale); finer checks of a quantized
# artifact compare it with `quantized_reference`. The image tokens are the encoder's part (VISION_THRESHOLDS).
THRESHOLDS: dict[str, Thresholds] = {
    "fp32": lm_gate(1e-4),  # the same math; XNNPACK's GEMMs and the custom SDPA only reorder sums
    "8da4w": lm_gate(1.5e-1, top1=0.75, exact_tokens=False),  # int4 weights, groups of 32 + int8 activations
    "8da8w": lm_gate(2e-2, top1=0.9, exact_tokens=False),  # int8 activations + per-channel weights
    "int8": lm_gate(2e-2, top1=0.9, exact_tokens=False),  # int8 per-channel weights, fp32 activations
}
QUANTS: tuple[str, ...] = tuple(THRESHOLDS)
# 8da4w / 4-bit embedding group when the `group_size` option is not given: ExecuTorch's own LLM export
# default (-G 32), the group of llama.cpp's Q4_0; at 32 XNNPACK decodes as fast as llama.cpp (README).
DEFAULT_GROUP_SIZE = 32

# What a quantized embedding table or vision encoder adds to THRESHOLDS[quant] (see `combine`).
EMBEDDING_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": lm_gate(0.0),  # an fp32 table adds nothing
    "8": lm_gate(1e-2, top1=0.9, exact_tokens=False),  # 8-bit grouped table
    "4": lm_gate(5e-2, top1=0.75, exact_tokens=False),  # 4-bit grouped table
}
# The vision gate: image tokens against the fp32 eager encoder, and what their error adds to the logits.
VISION_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(image_cos=0.9999, image_rel=1e-3, logits_rel=0.0),
    "8da8w": Thresholds(image_cos=0.999, image_rel=4e-2, logits_rel=1e-2, top1=0.9, exact_tokens=False),
    "8da4w": Thresholds(image_cos=0.98, image_rel=2e-1, logits_rel=1e-1, top1=0.75, exact_tokens=False),
}
VISION_QUANTS: tuple[str, ...] = tuple(VISION_THRESHOLDS)
EMBEDDING_QUANTS = tuple(EMBEDDING_THRESHOLDS)
# The defaults that follow the LM's quant (see the module docstring).
DEFAULT_EMBEDDING_QUANT = {"fp32": "fp32", "8da4w": "4", "8da8w": "8", "int8": "8"}
DEFAULT_VISION_QUANT = {"fp32": "fp32", "8da4w": "8da8w", "8da8w": "8da8w", "int8": "8da8w"}


@dataclass(frozen=True)
class PteOptions:
    """The ExecuTorch target's own options (module docstring); "auto": the default for the LM's quant."""

    group_size: int = DEFAULT_GROUP_SIZE
    embedding_quant: str = "auto"
    vision_quant: str = "auto"

    def __post_init__(self):
        if self.group_size <= 0:
            raise ConfigError(f"pte: group_size must be positive, got {self.group_size}")
        check_choice("pte", "embedding_quant", self.embedding_quant, ("auto",) + EMBEDDING_QUANTS)
        check_choice("pte", "vision_quant", self.vision_quant, ("auto",) + VISION_QUANTS)

    def resolved(self, quant: str) -> PteOptions:
        return dataclasses.replace(
            self, embedding_quant=DEFAULT_EMBEDDING_QUANT[quant] if self.embedding_quant == "auto" else self.embedding_quant,
            vision_quant=DEFAULT_VISION_QUANT[quant] if self.vision_quant == "auto" else self.vision_quant)


def thresholds_for(options: ExportOptions) -> Thresholds:
    """The gate of an export: THRESHOLDS[quant] combined with what a quantized embedding / vision encoder adds."""
    o = ExecuTorchTarget().options(options)
    return combine(THRESHOLDS[options.quant], VISION_THRESHOLDS[o.vision_quant], EMBEDDING_THRESHOLDS[o.embedding_quant])


# ---- quantization ----------------------------------------------------------------------------------
def _quiet(fn: Callable[[], nn.Module]) -> nn.Module:
    """ExecuTorch's quant handlers print one line per layer; keep the CLI's output ours."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


def _torchao_8da(module: nn.Module, weight_dtype: torch.dtype, group_size: int | None) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    kept_fp32: list[str] = []

    def eligible(m: nn.Module, fqn: str) -> bool:
        # a group must not straddle rows: other widths stay fp32, as in ExecuTorch's exporter
        if not isinstance(m, nn.Linear):
            return False
        if group_size is not None and m.in_features % group_size:
            kept_fp32.append(fqn)
            return False
        return True

    granularity = PerAxis(0) if group_size is None else PerGroup(group_size)
    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=weight_dtype, weight_granularity=granularity, intx_choose_qparams_algorithm="hqq_scale_only")
    with torch.no_grad():
        quantize_(module, config, filter_fn=eligible)
    if kept_fp32:
        log.info("%d linear(s) kept fp32, input width not a multiple of group size %s: %s",
                 len(kept_fp32), group_size, ", ".join(kept_fp32))
    return module


def _weight_only_int8(module: nn.Module, group_size: int) -> nn.Module:
    from executorch.examples.models.llama.source_transformation.quantize import WeightOnlyInt8QuantHandler

    return _quiet(lambda: WeightOnlyInt8QuantHandler(module).quantized_model())


# quant → how the linears of a module are rewritten (in place); group_size is ExportOptions.group_size
LINEAR_QUANT: dict[str, Callable[[nn.Module, int], nn.Module]] = {
    "fp32": lambda m, gs: m,
    "8da4w": lambda m, gs: _torchao_8da(m, torch.int4, gs),
    "8da8w": lambda m, gs: _torchao_8da(m, torch.int8, None),
    "int8": _weight_only_int8,
}


def _quantize_embedding(embedding: nn.Embedding, bits: str, group_size: int) -> nn.Module:
    holder = nn.ModuleDict({"table": embedding})  # the handler swaps children, so give it a parent
    if bits != "fp32":
        with _native_logs_silenced():  # the import loads pytorch_tokenizers, whose C++ side logs a line
            from executorch.examples.models.llama.source_transformation.quantize import EmbeddingQuantHandler

        b = int(bits)
        _quiet(lambda: EmbeddingQuantHandler(holder, bitwidth=b, group_size=group_size, packed=b == 4).quantized_model())
    return holder["table"]


# ---- the three exported modules --------------------------------------------------------------------
class TokenEmbedding(nn.Module):
    """(1, T) ids → (1, T, H)."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)  # (1, T, H)


class TextDecoder(nn.Module):
    """(1, T, H) embeddings at positions start.. → (1, V) logits of the last one; KV cache inside."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.transformer(None, {"input_pos": input_pos}, embeds)  # (1, V)


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"ExecuTorch export supports plain RoPE only, the LM has rope_type {rope['rope_type']!r}")
    return float(rope["rope_theta"])


def decoder_weights(lm: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The LM's weights under ExecuTorch llama names, in fp32 (the LM's own tensors when it is fp32: the
    quantizers replace weights, never write into them); fails on any weight it cannot place."""
    src = dict(lm.state_dict())
    src.setdefault("lm_head.weight", lm.get_output_embeddings().weight)  # tied heads may be absent
    out: dict[str, torch.Tensor] = {}
    for name, tensor in src.items():
        if name in _NOT_IN_DECODER:
            continue
        for pattern, target in NAME_TABLE:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, target, name)] = tensor.detach().float()
                break
        else:
            raise ConfigError(f"the LM weight {name!r} has no place in ExecuTorch's llama decoder "
                              "(biases and other extras are not supported)")
    return out


def build_text_decoder(lm: LlamaForCausalLM, max_seq_len: int) -> TextDecoder:
    """ExecuTorch's llama Transformer with its custom KV cache and SDPA ops, holding `lm`'s weights (fp32)."""
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs
    from executorch.examples.models.llama.source_transformation.custom_kv_cache import (
        replace_kv_cache_with_custom_kv_cache,
    )
    from executorch.examples.models.llama.source_transformation.sdpa import replace_sdpa_with_custom_op
    from transformers.initialization import no_init_weights

    c = lm.config
    if c.hidden_act != "silu" or getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ConfigError("ExecuTorch export supports LLaMA with SiLU and no biases only")
    if not 0 < max_seq_len <= c.max_position_embeddings:
        raise ConfigError(f"max_seq_len {max_seq_len} must be in 1..{c.max_position_embeddings} (the LM's context)")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    args = ModelArgs(
        dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, head_dim=head_dim, vocab_size=c.vocab_size,
        hidden_dim=c.intermediate_size, norm_eps=c.rms_norm_eps, rope_theta=_rope_theta(c),
        use_hf_rope=True,  # HF's rotate-half layout: q/k weights go in unpermuted
        max_batch_size=1, max_seq_len=max_seq_len, max_context_len=max_seq_len,
        use_kv_cache=True, use_sdpa_with_kv_cache_op=True, enable_dynamic_shape=True,
        apply_embedding=False, generate_full_logits=False,
    )
    with no_init_weights():  # the weights are assigned below: never write (page in) random ones
        transformer = construct_transformer(args)
    transformer = replace_sdpa_with_custom_op(transformer)  # this order is the exporter's
    transformer = replace_kv_cache_with_custom_kv_cache(transformer)
    for layer in transformer.layers:
        # The custom SDPA masks causally from the start position; the module still slices its S×S bool
        # mask (unused), which the program would store: keep one column of it.
        layer.attention.register_buffer("mask", layer.attention.mask[:, :1].clone(), persistent=False)
    missing, unexpected = transformer.load_state_dict(decoder_weights(lm), strict=False, assign=True)
    if unexpected or any("kv_cache" not in k for k in missing):
        raise ConfigError(f"weights do not fit ExecuTorch's llama decoder: missing {missing}, unexpected {unexpected}")
    return TextDecoder(transformer).eval()


def build_modules(model: MobileVLM, options: ExportOptions) -> dict[str, nn.Module]:
    """The three modules exactly as they are exported (quantized per `options`), runnable in eager.

    They share the model's fp32 tensors until a quantizer replaces them (the quantizers swap modules and
    parameters in place in the module tree, hence the structural copies): the model is never modified."""
    o = ExecuTorchTarget().options(options)
    vision = vision_encoder(model)  # (the layers that run only: `vision_encoder`)
    # CLIP's eager attention (matmul, softmax, matmul) rather than SDPA: torch.export decomposes SDPA into
    # a safe softmax whose fully-masked-row guards (eq, any, logical_not, where) XNNPACK does not take; on
    # the portable kernels they cost more than the delegated matmuls at 577 positions (encoder_profile.py).
    # No mask here, so the two compute the same thing.
    vision.vision_tower.vision_tower.set_attn_implementation("eager")
    LINEAR_QUANT[o.vision_quant](vision, o.group_size)
    table = float_copy(model.lm.get_input_embeddings())
    embedding = TokenEmbedding(_quantize_embedding(table, o.embedding_quant, o.group_size)).eval()
    decoder = build_text_decoder(model.lm, options.max_seq_len)
    LINEAR_QUANT[options.quant](decoder, o.group_size)
    return {"vision_encoder": vision, "token_embedding": embedding, "text_decoder": decoder}


# ---- lowering ------------------------------------------------------------------------------------
def _metadata(model: MobileVLM, tokenizer, options: ExportOptions) -> dict:
    t = model.config.text
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    return {
        "get_max_seq_len": options.max_seq_len,
        "get_max_context_len": options.max_seq_len,
        "get_bos_id": t.bos_token_id if bos is None else int(bos),
        "get_eos_ids": [t.eos_token_id if eos is None else int(eos)],
        "get_vocab_size": t.vocab_size,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": True,
    }


def cancel_transpose_pairs(program) -> int:
    """Drop `transpose(transpose(x, a, b), a, b)` from an exported program, in place; returns how many pairs.

    ExecuTorch's llama attention hands its KV caches around as (B, H, S, D) views: `CustomKVCache.update`
    returns `cache.transpose(1, 2)` and `SDPACustom` transposes them back. Views in eager, but after
    export each transpose is a copy, and XNNPACK copies both whole (max_seq_len-long) caches twice per layer
    and per token, a large share of the decode time (README, Results). Only the pair goes; the ops keep
    their order in the graph (the cache update still precedes the attention that reads the buffer).
    """
    transpose = torch.ops.aten.transpose.int
    graph = program.graph_module.graph

    def dims(node) -> tuple[int, int]:
        rank = node.args[0].meta["val"].dim()
        return tuple(sorted(d % rank for d in node.args[1:3]))

    pairs = 0
    for node in list(graph.nodes):
        inner = node.args[0] if node.op == "call_function" and node.target == transpose else None
        if isinstance(inner, torch.fx.Node) and inner.op == "call_function" and inner.target == transpose \
                and dims(inner) == dims(node):
            node.replace_all_uses_with(inner.args[0])
            graph.erase_node(node)
            if not inner.users:
                graph.erase_node(inner)
            pairs += 1
    program.graph_module.recompile()
    return pairs


def _export_programs(modules: dict[str, nn.Module], model: MobileVLM, max_seq_len: int) -> dict:
    from torch.export import Dim

    side = model.config.vision.image_size
    hidden = model.config.text.hidden_size
    seq = Dim("seq", min=1, max=max_seq_len)
    with torch.no_grad():
        programs = {
            # transformers' CLIP does not trace under strict (dynamo) export
            "vision_encoder": torch.export.export(modules["vision_encoder"], (torch.zeros(1, 3, side, side),), strict=False),
            "token_embedding": torch.export.export(
                modules["token_embedding"], (torch.zeros(1, 4, dtype=torch.long),), dynamic_shapes=({1: seq},), strict=True),
            "text_decoder": torch.export.export(
                modules["text_decoder"], (torch.zeros(1, 4, hidden), torch.tensor([0])),
                dynamic_shapes=({1: seq}, None), strict=True),
        }
    cancel_transpose_pairs(programs["text_decoder"])
    return programs


def _lower(programs: dict, metadata: dict):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.quant_fusion_pass import QuantFusionPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    def partitioners() -> list:
        # One partitioner over every precision: each run of ops XNNPACK takes (quantized linears with the
        # norms, activations and residual adds between them) becomes one delegate call. ExecuTorch's LLM
        # exporter instead puts each dynamically quantized linear in its own partition (lower peak memory
        # while XNNPACK packs weights at load), at more than twice the delegate calls per decoded token and
        # a slower decode (README, Results).
        return [XnnpackPartitioner()]

    edge = to_edge_transform_and_lower(
        programs,
        partitioner={name: partitioners() for name in programs},
        constant_methods=metadata,
        # the llama custom ops are not core ATen
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    return edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        passes=[QuantFusionPass()],
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        # plan the activations for the largest T (max_seq_len), not the example's
        sym_shape_eval_pass={name: ConstraintBasedSymShapeEvalPass() for name in programs},
    ))


# ---- runtimes ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _library_warnings_ignored():
    """torch.export's and ExecuTorch's warnings about their own deprecations (FutureWarning, from inside their
    passes and custom ops) and the KV cache's in-place update (a buffer mutation, intended): ~70 lines per
    export that no user of it can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Mutation on a buffer", category=UserWarning)
        yield


@contextlib.contextmanager
def _native_logs_silenced():
    """Standard error to nowhere, Python's and file descriptor 2, around ExecuTorch calls that log what a user
    cannot act on: the threadpool's CPU probing on every reset (through `sys.stderr`), "No temp allocator
    provided" from the custom and quantized kernels run eagerly (`ModuleRuntime`, straight to fd 2), the
    tokenizer library's regex note at import. Their C++ logs have no level to set from Python."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        with contextlib.redirect_stderr(io.StringIO()), _library_warnings_ignored():
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _StepRuntime:
    """`Runtime` over three callables with the .pte methods' signatures (tensors in, a tensor out)."""

    def __init__(self, call: Callable[[str, list], torch.Tensor], max_seq_len: int):
        self._call = call
        self.max_seq_len = max_seq_len
        self.pos = 0

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        out = self._call("vision_encoder", [torch.from_numpy(np.ascontiguousarray(pixels, np.float32))])
        return out[0].numpy().copy()  # (N, H)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        out = self._call("token_embedding", [torch.from_numpy(np.asarray(ids, np.int64))[None]])
        return out[0].numpy().copy()  # (T, H)

    def decode(self, embeds: np.ndarray, start_pos: int) -> np.ndarray:
        t = embeds.shape[0]
        if start_pos > self.pos:  # below: the static cache is overwritten from start_pos, nothing to drop
            raise ValueError(f"decode at position {start_pos}, but the cache holds {self.pos} positions")
        if start_pos + t > self.max_seq_len:
            # the program would abort on its own bounds check; say it in words first
            raise DataError(f"positions {start_pos}..{start_pos + t - 1} exceed max_seq_len {self.max_seq_len}")
        x = torch.from_numpy(np.ascontiguousarray(embeds, np.float32))[None]  # (1, T, H)
        out = self._call("text_decoder", [x, torch.tensor([start_pos], dtype=torch.long)])
        self.pos = start_pos + t
        return out[0].numpy().copy()  # (V,); copied: the method reuses its output memory


class PteRuntime(_StepRuntime):
    """A `model.pte` in ExecuTorch's Python runtime; one loaded `text_decoder` holds the KV cache."""

    def __init__(self, path: Path, threads: int = 2):
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        if not Path(path).is_file():
            raise DataError(f"no ExecuTorch program at {path}")
        with open(path, "rb") as f:  # the runtime aborts the process (C++ terminate) on some non-programs
            if f.read(8)[4:8] != PTE_MAGIC:
                raise DataError(f"{path} is not an ExecuTorch program (no {PTE_MAGIC.decode()} flatbuffer header)")
        _register_kernels()
        with _native_logs_silenced():  # six lines of CPU probing around `run`'s answers and error lines
            _unsafe_reset_threadpool(threads)  # before any method runs: the pool is process-wide
        self.program = Runtime.get().load_program(Path(path))
        self.methods = {m: self.program.load_method(m) for m in ("vision_encoder", "token_embedding", "text_decoder")}
        self.metadata = _read_constants(self.program)
        super().__init__(lambda name, inputs: self.methods[name].execute(inputs)[0], self.metadata["max_seq_len"])

    def close(self) -> None:
        self.methods, self.program = {}, None


class ModuleRuntime(_StepRuntime):
    """The exported modules run eagerly in PyTorch: the artifact before lowering (same quantization)."""

    def __init__(self, modules: dict[str, nn.Module], max_seq_len: int):
        self.modules = modules

        @torch.no_grad()
        def call(name: str, inputs: list) -> torch.Tensor:
            with _native_logs_silenced():  # the kernels log one line per call
                return self.modules[name](*inputs)

        super().__init__(call, max_seq_len)

    def close(self) -> None:
        self.modules = {}


def _register_kernels() -> None:
    """The pybindings runtime links only portable/optimized kernels and XNNPACK; the llama custom ops
    (update_cache, custom_sdpa) and the quantized_decomposed embedding kernels come from these libraries."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401


def _read_constants(program) -> dict:
    """The constant methods: {max_seq_len, bos_id, eos_ids, vocab_size, use_kv_cache, enable_dynamic_shape}."""
    out = {}
    for method in ("get_max_seq_len", "get_bos_id", "get_eos_ids", "get_vocab_size", "use_kv_cache", "enable_dynamic_shape"):
        value = list(program.load_method(method).execute([]))
        key = method.removeprefix("get_")
        out[key] = [int(v) for v in value] if method == "get_eos_ids" else (
            bool(value[0]) if isinstance(value[0], bool) else int(value[0]))
    return out


# ---- the target ----------------------------------------------------------------------------------
class ExecuTorchTarget(TargetBase):
    name = "pte"
    quants = QUANTS
    default_quant = "8da4w"
    Options = PteOptions

    def options(self, options: ExportOptions) -> PteOptions:
        return super().options(options).resolved(options.quant)

    def check(self, model: MobileVLM, options: ExportOptions) -> None:
        super().check(model, options)
        o, width = self.options(options), model.config.text.hidden_size
        if o.embedding_quant != "fp32" and width % o.group_size:  # the table's groups run along its rows
            raise ConfigError(f"pte: group_size {o.group_size} must divide the embedding width {width} "
                              f"(embedding_quant {o.embedding_quant}; or embedding_quant=fp32)")

    def export(self, model: MobileVLM, tokenizer, out_dir: Path, options: ExportOptions) -> list[Path]:
        self.check(model, options)
        t0 = time.perf_counter()
        modules = build_modules(model.eval(), options)
        with _library_warnings_ignored():
            program = _lower(_export_programs(modules, model, options.max_seq_len), _metadata(model, tokenizer, options))
        del modules
        path = Path(out_dir) / PTE_NAME
        with writing(path), open(path, "wb") as f:
            program.write_to_file(f)
        log.info("wrote %s (%.1f MiB) in %.1f s", path, path.stat().st_size / 2**20, time.perf_counter() - t0)
        return [path]

    def load(self, out_dir: Path, options: ExportOptions) -> PteRuntime:
        return PteRuntime(Path(out_dir) / PTE_NAME, options.threads)

    def quantized_reference(self, model: MobileVLM, options: ExportOptions, out_dir: Path) -> ModuleRuntime | None:
        """The same modules, same quantization, in eager PyTorch: isolates lowering error from quant error."""
        o = self.options(options)
        if (options.quant, o.vision_quant, o.embedding_quant) == ("fp32", "fp32", "fp32"):
            return None
        return ModuleRuntime(build_modules(model.eval(), options), options.max_seq_len)

    def thresholds(self, options: ExportOptions) -> Thresholds:
        return thresholds_for(options)
