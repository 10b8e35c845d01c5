"""ONNX target: the onnxruntime-genai split — `vision.onnx`, `embedding.onnx`, `decoder.onnx` + `onnx_model.json`.

The decoder is built node by node with `onnx.helper`, the way onnxruntime-genai's model builder builds
it, because that graph is what runs fast on CPU (DESIGN.md §3: 0.8–0.96× llama.cpp decode, against
0.69× for a `torch.onnx.export` graph with plain MatMul attention): onnxruntime's
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMSNorm, the residual add fused in),
one packed QKV MatMul per layer, com.microsoft GroupQueryAttention with the rotary embedding applied
inside it and a KV cache that may share one buffer between past and present, and MatMulNBits for int4.
The vision graph runs once per image and is exported with `torch.onnx.export(dynamo=True)`; the
embedding graph is a single Gather. Quantization (of the decoder: `quant`; of the vision graph: the
`vision_quant` option, by default the same): "fp16" stores the graph's weights in fp16 and computes in
fp16 (public tensors stay float32); "int8" quantizes the MatMul weights (lm_head included) to int8 per
tensor with dynamically quantized int8 activations (`quantize_dynamic`: DynamicQuantizeLinear +
MatMulInteger + Mul, which onnxruntime's CPU graph optimizer fuses at load into its int8 GEMM kernels:
DynamicQuantizeMatMul, or MatMulIntegerToFloat where q, k and v share one quantized input — the profile of
the vision graph shows no MatMulInteger left, tests/export/test_onnx.py);
"int4" to int4 blocks of `group_size` (MatMulNBits, int8 activations at accuracy_level 4). For int8 and int4
LMs the embedding table is stored in fp16 (Gather + Cast: half its fp32 size).

Decoder contract (batch and sequence axes dynamic):
  inputs_embeds (B, T, H) float32, attention_mask (B, P+T) int64 (ones over the real positions),
  position_ids (B, T) int64, past_key_values.{i}.key / .value (B, kv_heads, P, head_dim)
  → logits (B, T, V) float32, present.{i}.key / .value (B, kv_heads, P+T, head_dim).
  GroupQueryAttention wants seqlens_k (real positions − 1, int32) and total_sequence_length (scalar
  int32); the graph derives both from attention_mask (ReduceSum − 1, Shape[1]). position_ids feed
  GroupQueryAttention's rotary: honoured per token in a one-token step; a multi-token call (the prompt,
  or a chunk after it) uses position_ids[:, 0] + s, so positions must be contiguous there.
  Shared buffer: when past and present are bound to one buffer of capacity C ≥ P+T (IOBinding), the
  present outputs keep length C while attention_mask keeps length P+T; `OnnxRuntime` runs it that way.
  The KV cache dtype is the decoder's compute dtype (float16 for quant "fp16", else float32).

ExportOptions read: quant, max_seq_len (rotary tables = context length), threads (runtime), and the
target's own options (`OnnxOptions`, from `extra`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from alignkd.data.image import image_config
from alignkd.errors import CheckpointError, ConfigError, DataError
from alignkd.fileio import writing
from alignkd.model.mobilevlm import IMAGE_TOKEN_INDEX, MobileVLM
from alignkd.model.tokenizer import check_tokenizer_matches

from .base import EagerRuntime, ExportOptions, TargetBase, VisionEncoder, check_choice, float_copy, vision_encoder
from .parity import Thresholds, combine, lm_gate

CONFIG_FILE = "onnx_model.json"
GRAPH_FILES = {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx"}
GRAPH_INPUTS = {"vision": "pixel_values", "embedding": "input_ids", "decoder": "inputs_embeds"}  # one each
OPSET = 21
MS = "com.microsoft"
# Protobuf cannot serialise a message past 2 GiB: bigger graphs keep their weights in a side file.
_EXTERNAL_DATA_BYTES = 1 << 30
# Compute dtype of the decoder and embedding table; int8 / int4 quantize an fp32 graph.
_FLOAT_TYPE = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "int8": TensorProto.FLOAT, "int4": TensorProto.FLOAT}

# int4 block when the `group_size` option is not given. onnxruntime's int8-activation kernel costs more per
# block than llama.cpp's: at the 1.7B widths block 64 decodes as fast as llama.cpp's Q4_0 and block 32
# slower (README, Results). Block 64 stores 4.5 bits per weight (an fp32 scale per 64), as Q4_0 does.
DEFAULT_GROUP_SIZE = 64
INT4_BLOCKS = (16, 32, 64, 128, 256)  # what MlasQuantizeBlockwise accepts
VISION_QUANTS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class OnnxOptions:
    """The ONNX target's own options (`ExportOptions.extra`)."""

    group_size: int = DEFAULT_GROUP_SIZE
    """int4 block size: 16, 32, 64, 128 or 256."""
    accuracy_level: int = 4
    """MatMulNBits compute type: 0 = unset (fp32), 1 fp32, 2 fp16, 3 bf16, 4 = int8 activations (fastest on
    CPU; what DESIGN.md §3 measured)."""
    int4_symmetric: bool = True
    """int4 without zero points (onnxruntime-genai's default)."""
    vision_quant: str = "auto"
    """The vision graph's quantization: fp32, fp16, int8 or int4; "auto" = the decoder's quant."""
    share_buffer: bool = True
    """Runtime: one past/present buffer per layer, max_seq_len long, bound as both with IOBinding."""
    embedding_fp16: bool = True
    """int8 / int4: store the token-embedding table in fp16 (False keeps fp32). The Gather reads one row per
    token, so this is size, not speed; its rounding (at most 4.9e-4 relative) is far below the weights'."""

    def __post_init__(self):
        if self.group_size not in INT4_BLOCKS:
            raise ConfigError(f"onnx: int4 group_size must be one of {', '.join(map(str, INT4_BLOCKS))} (the blocks "
                              f"onnxruntime's quantizer takes), got {self.group_size}")
        check_choice("onnx", "accuracy_level", self.accuracy_level, (0, 1, 2, 3, 4))
        check_choice("onnx", "vision_quant", self.vision_quant, ("auto",) + VISION_QUANTS)

    def resolved(self, quant: str) -> OnnxOptions:
        return dataclasses.replace(self, vision_quant=quant if self.vision_quant == "auto" else self.vision_quant)


# Parity gate per decoder quantization against the eager fp32 model, the vision graph quantized as the decoder
# (the default); what each bound was set against: docs/parity_gates.md. The image tokens are the vision graph's
# part of the gate (VISION_THRESHOLDS, `combine`).
THRESHOLDS: dict[str, Thresholds] = {
    "fp32": lm_gate(1e-4),  # only kernel summation order differs
    "fp16": lm_gate(1e-2, top1=0.9, exact_tokens=False),  # fp16 weights and activations
    "int8": lm_gate(5e-2, top1=0.85, exact_tokens=False),  # dynamic: per-tensor weights, per-call activations
    # int4 weights + int8 activations (accuracy_level 4): one flipped near-tie changes every later greedy
    # token, so only top-1 is gated
    "int4": lm_gate(2e-1, top1=0.75, exact_tokens=False),
}
# The vision gate: image tokens against the fp32 eager encoder, and what their error adds to the logits.
VISION_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(image_cos=0.99999, image_rel=1e-3, logits_rel=0.0),
    "fp16": Thresholds(image_cos=0.9995, image_rel=5e-3, logits_rel=1e-3, top1=0.9, exact_tokens=False),
    "int8": Thresholds(image_cos=0.999, image_rel=4e-2, logits_rel=2e-2, top1=0.9, exact_tokens=False),
    "int4": Thresholds(image_cos=0.98, image_rel=2.5e-1, logits_rel=1e-1, top1=0.75, exact_tokens=False),
}


@dataclass(frozen=True)
class _Weight:
    onnx: str
    """Initializer name in decoder.onnx ("{i}" = layer index)."""
    sources: tuple[str, ...]
    """`model.lm` state-dict keys; several are concatenated along the output features."""
    matmul: bool
    """Stored transposed, (in, out), as MatMul's B; otherwise as is (norm weights)."""


_L = "model.layers.{i}."
LAYER_WEIGHTS: tuple[_Weight, ...] = (
    _Weight(_L + "input_layernorm.weight", (_L + "input_layernorm.weight",), False),
    _Weight(_L + "attn.qkv_proj.MatMul.weight",
            (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"), True),
    _Weight(_L + "attn.o_proj.MatMul.weight", (_L + "self_attn.o_proj.weight",), True),
    _Weight(_L + "post_attention_layernorm.weight", (_L + "post_attention_layernorm.weight",), False),
    _Weight(_L + "mlp.gate_proj.MatMul.weight", (_L + "mlp.gate_proj.weight",), True),
    _Weight(_L + "mlp.up_proj.MatMul.weight", (_L + "mlp.up_proj.weight",), True),
    _Weight(_L + "mlp.down_proj.MatMul.weight", (_L + "mlp.down_proj.weight",), True),
)
FINAL_WEIGHTS: tuple[_Weight, ...] = (
    _Weight("model.norm.weight", ("model.norm.weight",), False),
    _Weight("lm_head.MatMul.weight", ("lm_head.weight",), True),
)
EMBEDDING_WEIGHT = _Weight("model.embed_tokens.weight", ("model.embed_tokens.weight",), False)
# Vision MatMul weights are renamed "<MobileVLM Linear>.MatMul.weight" (the exporter calls them val_N).
_MATMUL_WEIGHT = ".MatMul.weight"


def decoder_weight_table(num_layers: int) -> list[_Weight]:
    """Every decoder initializer that holds model weights, layer indices filled in."""
    def fill(w: _Weight, i: int) -> _Weight:
        return _Weight(w.onnx.format(i=i), tuple(s.format(i=i) for s in w.sources), w.matmul)

    return [fill(w, i) for i in range(num_layers) for w in LAYER_WEIGHTS] + list(FINAL_WEIGHTS)


class _Graph:
    """Builds a model node by node, so the decoder reads top to bottom like the model. Weights go straight
    into the model's graph: one copy of them (make_graph + make_model would hold three, 16 GB at 1.7B)."""

    def __init__(self, name: str, domains: tuple[str, ...] = ("",)) -> None:
        self.model = helper.make_model(helper.make_graph([], name, [], []), producer_name="alignkd",
                                       opset_imports=[helper.make_opsetid(d, OPSET if d == "" else 1) for d in domains])

    def const(self, name: str, value: np.ndarray) -> str:
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | str, name: str, domain: str = "", **attrs) -> list[str]:
        outs = [outputs] if isinstance(outputs, str) else outputs
        self.model.graph.node.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def finish(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        self.model.graph.input.extend(inputs)
        self.model.graph.output.extend(outputs)
        return self.model


def _rotary_tables(model: MobileVLM, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(max_seq_len, head_dim/2) cos and sin, from the model's own rotary module (its exact arithmetic)."""
    t = model.config.text
    pos = torch.arange(max_seq_len)[None]  # (1, L)
    with torch.no_grad():
        cos, sin = model.lm.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)  # (1, L, head_dim) each
    half = t.head_dim // 2
    # HF duplicates the frequencies over both halves (rotate_half layout); GQA takes one half.
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def build_decoder(model: MobileVLM, max_seq_len: int, float_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """The LLaMA decoder as onnxruntime-genai builds it, without embeddings, in fp32 or fp16."""
    t = model.config.text
    np_dtype = helper.tensor_dtype_to_np_dtype(float_type)
    state = {k: v.detach().float() for k, v in model.lm.state_dict().items()}
    g = _Graph("mobilevlm_decoder", ("", MS))
    for w in decoder_weight_table(t.num_layers):
        value = torch.cat([state[s] for s in w.sources], 0)  # (out, in) or (H,)
        g.const(w.onnx, (value.T if w.matmul else value).contiguous().numpy().astype(np_dtype, copy=False))
    cos, sin = _rotary_tables(model, max_seq_len)
    g.const("cos_cache", cos.astype(np_dtype))
    g.const("sin_cache", sin.astype(np_dtype))
    g.const("one_i64", np.array([1], np.int64))
    g.const("axis1_i64", np.array([1], np.int64))
    g.const("index1_i64", np.array(1, np.int64))

    # GroupQueryAttention's length inputs, derived once from the public attention_mask.
    g.op("ReduceSum", ["attention_mask", "axis1_i64"], "mask_sum", "mask_sum", keepdims=0)  # (B,)
    g.op("Sub", ["mask_sum", "one_i64"], "seqlens_k_i64", "seqlens_k_sub")
    g.op("Cast", ["seqlens_k_i64"], "seqlens_k", "seqlens_k_cast", to=TensorProto.INT32)  # (B,) int32
    g.op("Shape", ["attention_mask"], "mask_shape", "mask_shape")
    g.op("Gather", ["mask_shape", "index1_i64"], "total_len_i64", "total_len_gather", axis=0)  # scalar
    g.op("Cast", ["total_len_i64"], "total_sequence_length", "total_len_cast", to=TensorProto.INT32)

    x = "inputs_embeds"  # (B, T, H)
    if float_type != TensorProto.FLOAT:
        x = g.op("Cast", [x], "inputs_embeds_cast", "inputs_embeds_cast", to=float_type)[0]
    eps = float(t.rms_norm_eps)
    residual, pending = x, None  # pending: the last sublayer output, not yet added to the residual
    for i in range(t.num_layers):
        p = f"model.layers.{i}."
        if pending is None:
            normed = g.op("SimplifiedLayerNormalization", [x, p + "input_layernorm.weight"], p + "input_layernorm.out",
                          p + "input_layernorm", epsilon=eps, axis=-1, stash_type=1)[0]
        else:
            normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [pending, residual, p + "input_layernorm.weight"],
                                          [p + "input_layernorm.out", "", "", p + "input_layernorm.residual"],
                                          p + "input_layernorm", domain=MS, epsilon=eps)
        qkv = g.op("MatMul", [normed, p + "attn.qkv_proj.MatMul.weight"], p + "attn.qkv", p + "attn.qkv_proj.MatMul")[0]
        attn = g.op(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length",
             "cos_cache", "sin_cache", "position_ids"],
            [p + "attn.out", f"present.{i}.key", f"present.{i}.value"],
            p + "attn.GroupQueryAttention", domain=MS,
            num_heads=t.num_heads, kv_num_heads=t.num_kv_heads, do_rotary=1, rotary_interleaved=0,
        )[0]
        o = g.op("MatMul", [attn, p + "attn.o_proj.MatMul.weight"], p + "attn.o", p + "attn.o_proj.MatMul")[0]
        normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, p + "post_attention_layernorm.weight"],
                                      [p + "post_attention_layernorm.out", "", "", p + "post_attention_layernorm.residual"],
                                      p + "post_attention_layernorm", domain=MS, epsilon=eps)
        gate = g.op("MatMul", [normed, p + "mlp.gate_proj.MatMul.weight"], p + "mlp.gate", p + "mlp.gate_proj.MatMul")[0]
        up = g.op("MatMul", [normed, p + "mlp.up_proj.MatMul.weight"], p + "mlp.up", p + "mlp.up_proj.MatMul")[0]
        sig = g.op("Sigmoid", [gate], p + "mlp.sigmoid", p + "mlp.act.Sigmoid")[0]
        act = g.op("Mul", [gate, sig], p + "mlp.act", p + "mlp.act.Mul")[0]  # SiLU
        prod = g.op("Mul", [act, up], p + "mlp.prod", p + "mlp.Mul")[0]
        pending = g.op("MatMul", [prod, p + "mlp.down_proj.MatMul.weight"], p + "mlp.down", p + "mlp.down_proj.MatMul")[0]
    normed = g.op("SkipSimplifiedLayerNormalization", [pending, residual, "model.norm.weight"], ["model.norm.out"],
                  "model.norm", domain=MS, epsilon=eps)[0]
    logits = "logits" if float_type == TensorProto.FLOAT else "logits_compute"
    g.op("MatMul", [normed, "lm_head.MatMul.weight"], logits, "lm_head.MatMul")  # (B, T, V)
    if logits != "logits":
        g.op("Cast", [logits], "logits", "logits_cast", to=TensorProto.FLOAT)

    kv_shape = ["batch_size", t.num_kv_heads, "past_sequence_length", t.head_dim]
    present_shape = ["batch_size", t.num_kv_heads, "total_sequence_length", t.head_dim]
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", t.hidden_size]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", t.vocab_size])]
    for i in range(t.num_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", float_type, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", float_type, present_shape))
    return g.finish(inputs, outputs)


def build_embedding(model: MobileVLM, float_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """input_ids (B, T) int64 → inputs_embeds (B, T, H) float32: one Gather over the token table."""
    t = model.config.text
    table = model.lm.get_input_embeddings().weight.detach().float().numpy()  # (V, H)
    g = _Graph("mobilevlm_embedding")
    g.const(EMBEDDING_WEIGHT.onnx, table.astype(helper.tensor_dtype_to_np_dtype(float_type)))
    gathered = "inputs_embeds" if float_type == TensorProto.FLOAT else "inputs_embeds_raw"
    g.op("Gather", [EMBEDDING_WEIGHT.onnx, "input_ids"], gathered, "model.embed_tokens.Gather", axis=0)
    if gathered != "inputs_embeds":
        g.op("Cast", [gathered], "inputs_embeds", "inputs_embeds_cast", to=TensorProto.FLOAT)
    return g.finish(
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", t.hidden_size])],
    )


def export_vision(model: MobileVLM) -> onnx.ModelProto:
    """pixel_values (1, 3, S, S) float32 → image_features (1, N, H) float32, via torch.onnx.export(dynamo),
    of `vision_encoder` (float32, the CLIP layers that run only)."""
    encoder = vision_encoder(model)
    side = model.config.vision.image_size
    # the exporter warns that torchvision (which we do not use) is missing, and torch's pytree of its own
    # deprecations: lines no user of the export can act on
    with torch.no_grad(), _quiet_logging(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(encoder, (torch.zeros(1, 3, side, side),), dynamo=True, verbose=False,
                                    input_names=["pixel_values"], output_names=["image_features"])
    proto = program.model_proto
    _name_vision_weights(proto, encoder)
    return proto


def _name_vision_weights(proto: onnx.ModelProto, model: VisionEncoder) -> None:
    """Rename MatMul weight initializers after the Linear they hold, matched by exact value (the exporter
    transposes them into anonymous constants), so the graph can be read back against the model."""
    linears = {**{f"vision_tower.{n}": m for n, m in model.vision_tower.named_modules()},
               **{f"mm_projector.{n}": m for n, m in model.mm_projector.named_modules()}}
    by_value = {m.weight.detach().T.contiguous().numpy().tobytes(): name + _MATMUL_WEIGHT
                for name, m in linears.items() if isinstance(m, torch.nn.Linear)}
    matmul_b = {n.input[1] for n in proto.graph.node if n.op_type == "MatMul"}
    renamed = {}
    for init in proto.graph.initializer:
        if init.name in matmul_b:
            new = by_value.get(numpy_helper.to_array(init).astype(np.float32).tobytes())
            if new is not None and new not in renamed.values():
                renamed[init.name] = new
                init.name = new
    for node in proto.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]


# ---- quantization ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_logging(level: int = logging.INFO):
    """Silence records up to `level`: importing onnxruntime.quantization sets the root logger to INFO, after
    which the quantizers log every node and the dynamo exporter every pass."""
    before = logging.root.manager.disable
    logging.disable(max(level, before))
    try:
        yield
    finally:
        logging.disable(before)


def quantize(proto: onnx.ModelProto, quant: str, o: OnnxOptions) -> onnx.ModelProto:
    """Weight quantization of every MatMul with a constant weight: int8 dynamic or int4 block-wise; fp16
    converts the whole graph (public tensors stay float32); fp32 leaves it."""
    with _quiet_logging(logging.WARNING):  # quantize_dynamic's advice to run its pre-processing
        if quant == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            return convert_float_to_float16(proto, keep_io_types=True)
        if quant == "int4":
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(proto, bits=4, block_size=o.group_size, is_symmetric=o.int4_symmetric,
                                     accuracy_level=o.accuracy_level)
            q.process()
            return q.model.model
        if quant == "int8":
            import tempfile

            from onnxruntime.quantization import QuantType, quantize_dynamic

            with tempfile.TemporaryDirectory() as tmp:
                src, dst = Path(tmp, "in.onnx"), Path(tmp, "out.onnx")
                _save(proto, src)
                # Contrib-op outputs have no inferred type; every float tensor here is float32.
                quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                                 use_external_data_format=_weight_bytes(proto) > _EXTERNAL_DATA_BYTES,
                                 extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT})
                return onnx.load(dst)
    return proto


def _weight_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(i.raw_data) for i in proto.graph.initializer)


def _save(proto: onnx.ModelProto, path: Path) -> list[Path]:
    """Write one graph; past the protobuf limit its weights go to `<name>.data` beside it."""
    if _weight_bytes(proto) <= _EXTERNAL_DATA_BYTES:
        with writing(path):
            onnx.save_model(proto, path)
        return [path]
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # external data is appended to: never mix with an older export
    with writing(data):
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return [path, data]


# ---- reading weights back ---------------------------------------------------------------------------
def _dequant_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, bits: int,
                   block: int) -> np.ndarray:
    """MatMulNBits' packed B (N, blocks, blob) + scales (+ zero points) → the float weight (K, N)."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    q = np.stack([(b >> (bits * j)) & mask for j in range(per_byte)], -1).reshape(n, -1)  # (N, blocks·block), low bits first
    blocks = q.shape[1] // block
    if zero_points is None:
        zp = np.full((n, blocks), 1 << (bits - 1), np.float32)
    else:
        zp = np.stack([(zero_points >> (bits * j)) & mask for j in range(per_byte)], -1).reshape(n, -1)[:, :blocks]
    w = (q.reshape(n, blocks, block) - zp.astype(np.float32)[..., None]) * scales.reshape(n, blocks, 1).astype(np.float32)
    return w.reshape(n, -1)[:, :k].T  # (K, N)


def read_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float32 values of a graph's weights under their pre-quantization names (int4 / int8 dequantized)."""
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    out = {name: v.astype(np.float32) for name, v in inits.items() if v.dtype.kind == "f"}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            zp = inits.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            name = node.input[1].removesuffix(f"_Q{a.get('bits', 4)}")
            out[name] = _dequant_nbits(inits[node.input[1]], inits[node.input[2]], zp, a["K"], a["N"], a.get("bits", 4),
                                       a["block_size"])
    for name, v in inits.items():  # quantize_dynamic's int8 weights: <name>_quantized, _scale, _zero_point
        base = name.removesuffix("_quantized")
        if base != name and base + "_scale" in inits:
            zp = inits.get(base + "_zero_point", np.zeros((), v.dtype)).astype(np.float32)
            out[base] = (v.astype(np.float32) - zp) * inits[base + "_scale"].astype(np.float32)
    return out


@torch.no_grad()
def dequantized_reference(model: MobileVLM, out_dir: Path) -> MobileVLM:
    """A copy of `model` holding the weights the exported graphs hold (quantized ones de-quantized).

    Comparing an artifact with this model isolates the runtime's own error (activation quantization,
    fp16 compute, kernel order) from the weight-quantization error. Vision biases, norms and the conv
    keep the model's values (the exporter names them anonymously): exact for fp32 / int8 / int4. The copy
    shares every other tensor with `model` (`float_copy`); the graphs' weights are assigned, never copied
    into a shared tensor.
    """
    ref = float_copy(model)
    shapes = ref.state_dict()
    state: dict[str, torch.Tensor] = {}  # our names → the graphs' weights, (out, in) views
    decoder = read_weights(onnx.load(out_dir / GRAPH_FILES["decoder"]))
    embedding = read_weights(onnx.load(out_dir / GRAPH_FILES["embedding"]))
    for w, graph in [(w, decoder) for w in decoder_weight_table(model.config.text.num_layers)] + [(EMBEDDING_WEIGHT, embedding)]:
        value = torch.from_numpy(graph[w.onnx])
        value = value.T if w.matmul else value  # (out, in) or (H,)
        names = ["lm." + s for s in w.sources]
        state.update(zip(names, value.split([shapes[n].shape[0] for n in names], 0)))
    del decoder, embedding
    for name, value in read_weights(onnx.load(out_dir / GRAPH_FILES["vision"])).items():
        if name.endswith(_MATMUL_WEIGHT):
            state[name.removesuffix(_MATMUL_WEIGHT) + ".weight"] = torch.from_numpy(value).T  # (out, in)
    # lm_head and the token table get their own tensors: untied, as the graphs may store them differently
    ref.load_state_dict(state, strict=False, assign=True)
    return ref.eval()


# ---- metadata ---------------------------------------------------------------------------------------
def _io(values) -> dict:
    return {v.name: {"dtype": str(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
                     "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values}


def _graph_entry(proto: onnx.ModelProto, filename: str) -> dict:
    return {"filename": filename, "inputs": _io(proto.graph.input), "outputs": _io(proto.graph.output)}


def model_config(model: MobileVLM, protos: dict[str, onnx.ModelProto], options: ExportOptions) -> dict:
    """onnx_model.json: what an app needs to drive the three graphs (genai_config.json-like)."""
    t, o = model.config.text, OnnxTarget().options(options)
    decoder = _graph_entry(protos["decoder"], GRAPH_FILES["decoder"])
    decoder.update({
        "hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "head_size": t.head_dim, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "kv_cache_dtype": "float16" if options.quant == "fp16" else "float32",
        "past_present_share_buffer": True,
        "notes": {
            "past_present_share_buffer": "optional: bind past_key_values.{i}.* and present.{i}.* to one "
                                         "(1, kv_heads, context_length, head_size) buffer; attention_mask stays (1, past + new)",
            "attention_mask": "(1, past + new) ones; the graph derives GroupQueryAttention's seqlens_k and total_sequence_length",
            "position_ids": "past .. past + new - 1; a multi-token call uses only the first (positions must be contiguous)",
        },
    })
    quant = {"quant": options.quant}
    if "int4" in (options.quant, o.vision_quant):
        quant.update(block_size=o.group_size, accuracy_level=o.accuracy_level, symmetric=o.int4_symmetric)
    quant["vision_quant"] = o.vision_quant
    quant["embedding_dtype"] = str(helper.tensor_dtype_to_np_dtype(_embedding_type(options.quant, o)))
    return {
        "format": "alignkd-onnx/1",
        "model": {
            "type": "mobilevlm", "preset": model.config.name, "vocab_size": t.vocab_size,
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
            "context_length": options.max_seq_len, "image_token_index": IMAGE_TOKEN_INDEX,
            "num_image_tokens": model.config.num_image_tokens,
            "vision": _graph_entry(protos["vision"], GRAPH_FILES["vision"]),
            "embedding": _graph_entry(protos["embedding"], GRAPH_FILES["embedding"]),
            "decoder": decoder,
        },
        "quantization": quant,
        "preprocessing": image_config(model.config).to_dict(),
    }


# ---- runtime -----------------------------------------------------------------------------------------
class OnnxRuntime:
    """The three graphs in onnxruntime (CPU EP); the decoder keeps its KV cache between `decode` calls."""

    def __init__(self, out_dir: Path, threads: int = 2, share_buffer: bool = True):
        path = Path(out_dir) / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} not found: not an ONNX export directory")
        self.config = json.loads(path.read_text())
        m = self.config["model"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = {}
        for part in GRAPH_FILES:
            graph = Path(out_dir) / m[part]["filename"]
            if not graph.is_file():
                raise CheckpointError(f"{graph} not found (listed in {path})")
            self.sessions[part] = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
            names = [i.name for i in self.sessions[part].get_inputs()]
            if GRAPH_INPUTS[part] not in names:  # graphs swapped or renamed: found here, not at the first call
                raise CheckpointError(f"{graph} is not the {part} graph (its inputs: {', '.join(names)})")
        d = m["decoder"]
        self.context_length = int(m["context_length"])
        self.kv_heads, self.head_size = int(d["num_key_value_heads"]), int(d["head_size"])
        self.kv_dtype = np.dtype(d["kv_cache_dtype"])
        self.kv_names = [f"{i}.{kv}" for i in range(d["num_hidden_layers"]) for kv in ("key", "value")]
        self.image_shape = tuple(m["vision"]["inputs"]["pixel_values"]["shape"])
        self.share_buffer = share_buffer
        self.pos = 0
        self.past: dict[str, np.ndarray] = {}
        self.buffers: dict[str, ort.OrtValue] = {}
        self.binding = None

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        if tuple(pixels.shape) != self.image_shape:
            raise DataError(f"pixels of shape {tuple(pixels.shape)}, the vision graph takes {self.image_shape}")
        return self.sessions["vision"].run(None, {"pixel_values": pixels.astype(np.float32)})[0][0]  # (N, H)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.sessions["embedding"].run(None, {"input_ids": ids.astype(np.int64)[None]})[0][0]  # (T, H)

    def _reset(self) -> None:
        def zeros(length: int) -> np.ndarray:
            return np.zeros((1, self.kv_heads, length, self.head_size), self.kv_dtype)

        if self.share_buffer:
            # GroupQueryAttention reads positions < P from the buffer and writes P..P+T-1 into it in place.
            self.buffers = {n: ort.OrtValue.ortvalue_from_numpy(zeros(self.context_length)) for n in self.kv_names}
            # bound once per sequence: 2 × layers bindings per token would cost more than the small inputs
            self.binding = self.sessions["decoder"].io_binding()
            for n, buf in self.buffers.items():
                self.binding.bind_ortvalue_input("past_key_values." + n, buf)
                self.binding.bind_ortvalue_output("present." + n, buf)
        else:
            self.past = {n: zeros(0) for n in self.kv_names}

    def _run_shared(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, value)
        self.binding.bind_output("logits")  # unallocated, every call: its length T changes
        self.sessions["decoder"].run_with_iobinding(self.binding)
        return self.binding.get_outputs()[-1].numpy()  # (1, T, V): the latest-bound output

    def decode(self, embeds: np.ndarray, start_pos: int) -> np.ndarray:
        if start_pos > self.pos:
            raise ValueError(f"decode at position {start_pos}, but the cache holds {self.pos} positions")
        if start_pos == 0:
            self._reset()
        elif start_pos < self.pos and not self.share_buffer:  # the shared buffer is read up to the mask's length
            self.past = {n: v[:, :, :start_pos] for n, v in self.past.items()}
        t = embeds.shape[0]
        if start_pos + t > self.context_length:
            raise DataError(f"{start_pos + t} positions exceed the exported context length {self.context_length}")
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds, np.float32)[None],  # (1, T, H)
            "attention_mask": np.ones((1, start_pos + t), np.int64),  # (1, P+T)
            "position_ids": np.arange(start_pos, start_pos + t, dtype=np.int64)[None],  # (1, T)
        }
        if self.share_buffer:
            logits = self._run_shared(feeds)
        else:
            outs = self.sessions["decoder"].run(None, {**feeds, **{"past_key_values." + n: v for n, v in self.past.items()}})
            names = [o.name for o in self.sessions["decoder"].get_outputs()]
            logits = outs[names.index("logits")]
            self.past = {n: outs[names.index("present." + n)] for n in self.kv_names}
        self.pos = start_pos + t
        return logits[0, -1].astype(np.float32)  # (V,)

    def close(self) -> None:
        self.sessions, self.buffers, self.past, self.binding = {}, {}, {}, None


# ---- the target --------------------------------------------------------------------------------------
def _embedding_type(quant: str, o: OnnxOptions) -> int:
    return TensorProto.FLOAT16 if quant in ("int8", "int4") and o.embedding_fp16 else _FLOAT_TYPE[quant]


class OnnxTarget(TargetBase):
    name = "onnx"
    quants = ("fp32", "fp16", "int8", "int4")
    default_quant = "int4"
    Options = OnnxOptions

    def options(self, options: ExportOptions) -> OnnxOptions:
        return super().options(options).resolved(options.quant)

    def export(self, model: MobileVLM, tokenizer, out_dir: Path, options: ExportOptions) -> list[Path]:
        with _quiet_logging():
            return self._export(model, tokenizer, Path(out_dir), options)

    def _export(self, model: MobileVLM, tokenizer, out_dir: Path, options: ExportOptions) -> list[Path]:
        self.check(model, options)
        o = self.options(options)
        t = model.config.text
        if tokenizer is not None:
            check_tokenizer_matches(tokenizer, t.vocab_size, t.bos_token_id, t.eos_token_id, "the exported model")
        model = model.eval()
        protos = {"vision": quantize(export_vision(model), o.vision_quant, o),
                  "embedding": build_embedding(model, _embedding_type(options.quant, o)),
                  "decoder": build_decoder(model, options.max_seq_len, _FLOAT_TYPE[options.quant])}
        if options.quant in ("int8", "int4"):
            protos["decoder"] = quantize(protos["decoder"], options.quant, o)
        paths = [p for part, proto in protos.items() for p in _save(proto, out_dir / GRAPH_FILES[part])]
        config = out_dir / CONFIG_FILE
        with writing(config):
            config.write_text(json.dumps(model_config(model, protos, options), indent=2) + "\n")
        return paths + [config]

    def load(self, out_dir: Path, options: ExportOptions) -> OnnxRuntime:
        return OnnxRuntime(Path(out_dir), options.threads, self.options(options).share_buffer)

    def thresholds(self, options: ExportOptions) -> Thresholds:
        return combine(THRESHOLDS[options.quant], VISION_THRESHOLDS[self.options(options).vision_quant])

    def quantized_reference(self, model: MobileVLM, options: ExportOptions, out_dir: Path) -> EagerRuntime | None:
        """The eager model on the graphs' de-quantized weights: isolates runtime error from weight quantization."""
        if (options.quant, self.options(options).vision_quant) == ("fp32", "fp32"):
            return None
        return EagerRuntime(dequantized_reference(model, Path(out_dir)))
