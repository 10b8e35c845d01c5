"""The ONNX target: genai-style graphs that match the eager student, per quantization of the decoder and of the
vision graph, onnxruntime's fused int8 kernel on the int8 vision graph, and a gate that bites."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from alignkd.data.image import image_config
from alignkd.errors import ConfigError, DataError
from alignkd.export.base import EagerRuntime, ExportOptions
from alignkd.export.onnx_export import (
    CONFIG_FILE, GRAPH_FILES, VISION_THRESHOLDS, OnnxRuntime, OnnxTarget, dequantized_reference,
)
from alignkd.export.parity import Thresholds, check_parity, gate

PROMPT = [1, 17, -200, 23, 9, 40]
TARGET = OnnxTarget()

# The runtime's own error: the artifact against `dequantized_reference` (an eager model holding the graphs'
# de-quantized weights), i.e. with the weight-quantization error taken out; vision graph quantized as the decoder.
RUNTIME_THRESHOLDS: dict[str, Thresholds] = {
    # fp16 activations remain: rel 2.5e-4.
    "fp16": Thresholds(image_cos=0.9999, image_rel=1e-2, logits_rel=2e-3, top1=1.0, exact_tokens=True),
    # int8 activations remain: image cos 0.99998, rel 5.2e-3.
    "int8": Thresholds(image_cos=0.9999, image_rel=1e-2, logits_rel=3e-2, top1=1.0, exact_tokens=True),
    # accuracy_level 4 quantizes activations to int8 per block: image cos 0.99999, rel 3.8e-3 (block 64),
    # 4.6e-3 (block 32); with accuracy_level 0 (fp32 compute) it is the fp32 case: rel 2e-7.
    "int4": Thresholds(image_cos=0.9999, image_rel=1e-2, logits_rel=3e-2, top1=1.0, exact_tokens=True),
}


@pytest.fixture(scope="module")
def export(tiny_student, tmp_path_factory):
    """quant (+ extra) → export directory, each exported once per module."""
    done: dict[tuple, Path] = {}

    def get(quant: str, group_size: int | None = None, **extra) -> Path:
        key = (quant, group_size, tuple(sorted(extra.items())))
        if key not in done:
            out = tmp_path_factory.mktemp(f"onnx_{quant}")
            extra = {**extra, **({} if group_size is None else {"group_size": group_size})}
            TARGET.export(tiny_student, None, out, ExportOptions(quant=quant, extra=extra))
            done[key] = out
        return done[key]

    return get


@pytest.fixture(scope="module")
def px():
    return torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0)).numpy()


def _gate(rt, ref, px, thresholds):
    return check_parity(rt, ref, PROMPT, px, thresholds)


def test_fp32_matches_eager_tightly(tiny_student, export, px):
    out = export("fp32")
    rep = _gate(TARGET.load(out, ExportOptions()), TARGET.reference(tiny_student, ExportOptions()), px,
                TARGET.thresholds(ExportOptions()))
    assert rep["passed"], rep["failures"]
    assert rep["logits_rel"] < 1e-5 and rep["image_cos"] > 0.999999 and rep["embed_max_abs"] == 0.0
    assert rep["greedy_identical"] and rep["top1_agreement"] == 1.0


@pytest.mark.parametrize("quant", ["fp16", "int8", "int4"])
def test_quantized_export_passes_its_gate(tiny_student, export, px, quant):
    opts = ExportOptions(quant=quant)
    rep = _gate(TARGET.load(export(quant), opts), EagerRuntime(tiny_student), px, TARGET.thresholds(opts))
    assert rep["passed"], rep["failures"]


def test_quantized_exports_store_the_embedding_table_in_fp16(tiny_student, export):
    table = tiny_student.lm.get_input_embeddings().weight.detach().numpy()  # (V, H)
    for quant in ("int8", "int4"):
        (init,) = onnx.load(export(quant) / GRAPH_FILES["embedding"]).graph.initializer
        stored = numpy_helper.to_array(init)
        assert stored.dtype == np.float16 and stored.shape == table.shape
        np.testing.assert_array_equal(stored, table.astype(np.float16))
        rt = TARGET.load(export(quant), ExportOptions(quant=quant))
        ids = np.array([1, 17, 511, 0])
        out = rt.embed(ids)  # float32 out, as every public tensor
        assert out.dtype == np.float32 and np.array_equal(out, table[ids].astype(np.float16).astype(np.float32))
    (init,) = onnx.load(export("int4", embedding_fp16=False) / GRAPH_FILES["embedding"]).graph.initializer
    assert numpy_helper.to_array(init).dtype == np.float32


def test_int4_block_32_is_honoured_and_passes_the_gate(tiny_student, export, px):
    out = export("int4", group_size=32)
    blocks = {a.i for n in onnx.load(out / GRAPH_FILES["decoder"]).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "block_size"}
    assert blocks == {32} and json.loads((out / CONFIG_FILE).read_text())["quantization"]["block_size"] == 32
    opts = ExportOptions(quant="int4")
    rep = _gate(TARGET.load(out, opts), EagerRuntime(tiny_student), px, TARGET.thresholds(opts))
    assert rep["passed"], rep["failures"]


def _runtime_error(tiny_student, out: Path, px, quant: str, thresholds) -> dict:
    """The artifact against an eager model holding its own de-quantized weights: the runtime's error alone."""
    rt = TARGET.load(out, ExportOptions(quant=quant))
    return _gate(rt, EagerRuntime(dequantized_reference(tiny_student, out)), px, thresholds)


def test_int4_runtime_error_is_small_once_weight_quantization_is_taken_out(tiny_student, export, px):
    own = _runtime_error(tiny_student, export("int4"), px, "int4", RUNTIME_THRESHOLDS["int4"])
    assert own["passed"], own["failures"]  # accuracy_level 4: int8 activations are the only error left
    exact = _runtime_error(tiny_student, export("int4", accuracy_level=0), px, "int4", TARGET.thresholds(ExportOptions()))
    assert exact["passed"] and exact["logits_rel"] < 1e-5, exact  # fp32 compute: nothing left
    vs_fp32 = _gate(TARGET.load(export("int4", accuracy_level=0), ExportOptions(quant="int4")), EagerRuntime(tiny_student),
                    px, TARGET.thresholds(ExportOptions(quant="int4")))
    assert vs_fp32["passed"] and vs_fp32["logits_rel"] > 1e-2  # the weights really are 4-bit


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp16", "int8"])
def test_fp16_int8_runtime_error_alone(tiny_student, export, px, quant):
    own = _runtime_error(tiny_student, export(quant), px, quant, RUNTIME_THRESHOLDS[quant])
    assert own["passed"], own["failures"]


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]


def test_decoder_is_built_like_onnxruntime_genai(tiny_student, export):
    n = tiny_student.config.text.num_layers
    ops = _ops(export("fp32") / GRAPH_FILES["decoder"])
    assert ops.count("GroupQueryAttention") == n and ops.count("SkipSimplifiedLayerNormalization") == 2 * n
    assert ops.count("SimplifiedLayerNormalization") == 1 and ops.count("MatMul") == 5 * n + 1
    assert "Softmax" not in ops and "Gather" in ops  # Gather: total_sequence_length from the mask's shape
    int4 = onnx.load(export("int4") / GRAPH_FILES["decoder"])
    nbits = [n for n in int4.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 5 * n + 1 and "MatMul" not in [x.op_type for x in int4.graph.node]
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["block_size"] == 64 and attrs["accuracy_level"] == 4 and attrs["bits"] == 4  # the default
    assert "MatMulNBits" in _ops(export("int4") / GRAPH_FILES["vision"])
    assert "MatMulInteger" in _ops(export("int8") / GRAPH_FILES["decoder"])


def _decoder(out: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(out / GRAPH_FILES["decoder"]), providers=["CPUExecutionProvider"])


def _step(sess: ort.InferenceSession, x: np.ndarray, positions: list[int], past: dict) -> tuple[np.ndarray, dict]:
    """One decoder call with explicit inputs → (last logits, past for the next call)."""
    feeds = {"inputs_embeds": x, "attention_mask": np.ones((1, len(positions) + _past_len(past)), np.int64),
             "position_ids": np.asarray([positions]), **past}
    res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return res["logits"][0, -1], {k: res[k.replace("past_key_values", "present")] for k in past}


def _past_len(past: dict) -> int:
    return next(iter(past.values())).shape[2]


def _empty_past(t) -> dict:
    return {f"past_key_values.{i}.{kv}": np.zeros((1, t.num_kv_heads, 0, t.head_dim), np.float32)
            for i in range(t.num_layers) for kv in ("key", "value")}


def test_decoder_contract_with_explicit_past(tiny_student, export):
    """The documented interface, driven by hand: present grows to P+T; both runtime modes agree with eager."""
    out, t = export("fp32"), tiny_student.config.text
    sess = _decoder(out)
    x = np.random.default_rng(0).standard_normal((1, 13, t.hidden_size)).astype(np.float32)
    first, past = _step(sess, x[:, :12], list(range(12)), _empty_past(t))
    assert past["past_key_values.0.key"].shape == (1, t.num_kv_heads, 12, t.head_dim)
    second, past = _step(sess, x[:, 12:], [12], past)
    assert past["past_key_values.1.value"].shape == (1, t.num_kv_heads, 13, t.head_dim)
    eager = EagerRuntime(tiny_student)
    want = [eager.decode(x[0, :12], 0), eager.decode(x[0, 12:], 12)]
    np.testing.assert_allclose([first, second], want, atol=1e-5)
    for share in (True, False):
        rt = OnnxRuntime(out, threads=1, share_buffer=share)
        np.testing.assert_allclose([rt.decode(x[0, :12], 0), rt.decode(x[0, 12:], 12)], want, atol=1e-5)


def test_position_ids_reach_the_rotary_embedding(tiny_student, export):
    """A one-token step at position 20 after 12 tokens equals eager with positions 0..11, 20."""
    t = tiny_student.config.text
    sess = _decoder(export("fp32"))
    x = np.random.default_rng(1).standard_normal((1, 13, t.hidden_size)).astype(np.float32)
    _, past = _step(sess, x[:, :12], list(range(12)), _empty_past(t))
    got, _ = _step(sess, x[:, 12:], [20], past)
    with torch.no_grad():
        want = tiny_student.lm(inputs_embeds=torch.from_numpy(x), position_ids=torch.tensor([list(range(12)) + [20]])).logits
    np.testing.assert_allclose(got, want[0, -1].numpy(), atol=1e-5)


def test_onnx_model_json_describes_the_graphs(tiny_student, export):
    cfg = json.loads((export("int4") / CONFIG_FILE).read_text())
    m, t = cfg["model"], tiny_student.config.text
    assert [m[p]["filename"] for p in GRAPH_FILES] == list(GRAPH_FILES.values())
    assert m["vision"]["inputs"]["pixel_values"] == {"dtype": "float32", "shape": [1, 3, 48, 48]}
    assert m["vision"]["outputs"]["image_features"]["shape"] == [1, 144, t.hidden_size]
    assert m["embedding"]["inputs"]["input_ids"] == {"dtype": "int64", "shape": ["batch_size", "sequence_length"]}
    d = m["decoder"]
    assert set(d["inputs"]) == {"inputs_embeds", "attention_mask", "position_ids"} | {
        f"past_key_values.{i}.{kv}" for i in range(t.num_layers) for kv in ("key", "value")}
    assert d["inputs"]["past_key_values.1.value"]["shape"] == ["batch_size", 4, "past_sequence_length", 16]
    assert d["outputs"]["logits"]["shape"] == ["batch_size", "sequence_length", t.vocab_size]
    assert (d["num_hidden_layers"], d["num_attention_heads"], d["num_key_value_heads"], d["head_size"]) == (2, 4, 4, 16)
    ids = (m["bos_token_id"], m["eos_token_id"], m["pad_token_id"], m["vocab_size"], m["context_length"])
    assert ids == (1, 2, 0, 512, 512)
    assert cfg["quantization"] == {"quant": "int4", "block_size": 64, "accuracy_level": 4, "symmetric": True,
                                   "vision_quant": "int4", "embedding_dtype": "float16"}
    assert cfg["preprocessing"] == image_config(tiny_student.config).to_dict()
    assert json.loads((export("fp16") / CONFIG_FILE).read_text())["model"]["decoder"]["kv_cache_dtype"] == "float16"


def test_bad_options_are_config_errors(tiny_student, tmp_path):
    for opts, msg in [(ExportOptions(quant="q4_0"), "supported: fp32, fp16, int8, int4"),
                      (ExportOptions(quant="int4", extra={"group_size": 24}), "must be one of 16, 32, 64, 128, 256"),
                      # a power of 2 that onnxruntime's quantizer refuses (MlasQuantizeBlockwise)
                      (ExportOptions(quant="int4", extra={"group_size": 512}), "must be one of 16, 32, 64, 128, 256"),
                      (ExportOptions(extra={"acc_level": 4}), r"unknown option\(s\) acc_level \(known: group_size"),
                      (ExportOptions(quant="int4", extra={"accuracy_level": 7}), "accuracy_level"),
                      (ExportOptions(quant="int4", extra={"int4_symmetric": "maybe"}), "must be true or false"),
                      (ExportOptions(extra={"vision_quant": "8da8w"}),
                       r"vision_quant '8da8w' is not supported \(supported: auto, fp32, fp16, int8, int4\)"),
                      (ExportOptions(max_seq_len=4096), "context of 512")]:
        with pytest.raises(ConfigError, match=msg):
            TARGET.export(tiny_student, None, tmp_path, opts)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_runtime_refuses_overflow_and_gaps(export):
    rt = TARGET.load(export("fp32"), ExportOptions())
    with pytest.raises(DataError, match="exceed the exported context length 512"):
        rt.decode(np.zeros((513, 64), np.float32), 0)
    rt.decode(np.zeros((3, 64), np.float32), 0)
    with pytest.raises(ValueError, match="cache holds 3"):
        rt.decode(np.zeros((1, 64), np.float32), 5)
    with pytest.raises(DataError, match="vision graph takes"):
        rt.encode_image(np.zeros((1, 3, 32, 32), np.float32))


def _perturb(src: Path, dst: Path, name: str, factor: float) -> None:
    shutil.copytree(src, dst)
    model = onnx.load(dst / GRAPH_FILES["decoder"])
    init = next(i for i in model.graph.initializer if i.name == name)
    value = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(value * np.asarray(factor, value.dtype), name))
    onnx.save(model, dst / GRAPH_FILES["decoder"])


# fp32: one MLP scaled by 1.5 (the gate is as tight as fp32 arithmetic). int4: one layer's output
# projection with its sign flipped, as a zero-point / sign bug would; int4's own noise (rel 0.08 here)
# hides subtler damage such as a 1.5× MLP, which moves the tiny student's logits by about as much.
@pytest.mark.parametrize("quant, weight, factor", [("fp32", "model.layers.0.mlp.down_proj.MatMul.weight", 1.5),
                                                   ("int4", "model.layers.1.attn.o_proj.MatMul.weight_scales", -1.0)])
def test_a_broken_artifact_fails_the_gate(tiny_student, export, px, tmp_path, quant, weight, factor):
    _perturb(export(quant), tmp_path / "broken", weight, factor)
    broken = TARGET.load(tmp_path / "broken", ExportOptions(quant=quant))
    rep = _gate(broken, EagerRuntime(tiny_student), px, TARGET.thresholds(ExportOptions(quant=quant)))
    assert not rep["passed"] and any("relative error" in f for f in rep["failures"]), rep


@pytest.mark.parametrize("vision_quant", ["fp16", "int8", "int4"])
def test_vision_graph_quantized_alone_is_gated_against_the_fp32_encoder(tiny_student, export, px, vision_quant):
    """An fp32 decoder beside a quantized vision graph: the image tokens carry the vision quantization alone."""
    out = export("fp32", vision_quant=vision_quant)
    ops = _ops(out / GRAPH_FILES["vision"])
    assert {"fp16": "Cast", "int8": "MatMulInteger", "int4": "MatMulNBits"}[vision_quant] in ops
    assert "MatMulNBits" not in _ops(out / GRAPH_FILES["decoder"])  # the decoder stays fp32
    opts = ExportOptions(extra={"vision_quant": vision_quant})
    assert TARGET.thresholds(opts).image_cos == VISION_THRESHOLDS[vision_quant].image_cos
    rep = gate(TARGET, tiny_student, out, opts, PROMPT, px)
    assert rep["passed"], rep["failures"]
    assert rep["image_rel"] > 1e-4  # really quantized (fp32: rel ~2e-7)
    if vision_quant != "fp16":  # the de-quantized weights explain part of the error (activations the rest)
        assert rep["same_quant_reference"]["image_rel"] < rep["image_rel"]


def test_the_vision_graph_holds_only_the_clip_layers_that_run(tiny_student, export):
    """No initializer of the fp32 vision graph holds a weight of CLIP's unused last layer (matched by value,
    as the exporter names and transposes them its own way); the layers that run are all there."""
    graph = onnx.load(export("fp32") / GRAPH_FILES["vision"])
    values = {numpy_helper.to_array(t).astype(np.float32).tobytes() for t in graph.graph.initializer}
    layers = tiny_student.vision_tower.vision_tower.encoder.layers

    def stored(layer) -> bool:
        w = layer.mlp.fc1.weight.detach()
        return w.numpy().tobytes() in values or w.T.contiguous().numpy().tobytes() in values

    assert [stored(layer) for layer in layers] == [True, True, False]


def test_int8_matmuls_run_in_onnxruntimes_fused_int8_kernel(export, px, tmp_path):
    """quantize_dynamic writes DynamicQuantizeLinear + MatMulInteger + Mul; onnxruntime's optimizer fuses them at
    load into DynamicQuantizeMatMul, or MatMulIntegerToFloat where q, k and v share one quantized input (one
    DynamicQuantizeLinear): in the profile every int8 linear runs in one of those, none as MatMulInteger."""
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "vision")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(export("int8") / GRAPH_FILES["vision"]), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"pixel_values": px})
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})]
    n_linears = sum(1 for n in onnx.load(export("int8") / GRAPH_FILES["vision"]).graph.node if n.op_type == "MatMulInteger")
    assert kernels.count("DynamicQuantizeMatMul") + kernels.count("MatMulIntegerToFloat") == n_linears > 0
    assert kernels.count("MatMulIntegerToFloat") == 3 * 2  # q, k, v of each of the tiny tower's 2 layers
    assert "MatMulInteger" not in kernels


def test_dequantized_reference_shares_but_never_writes_the_model(tiny_student, export):
    before = {k: v.clone() for k, v in tiny_student.state_dict().items()}
    ref = dequantized_reference(tiny_student, export("int4"))
    assert not torch.equal(ref.lm.lm_head.weight, tiny_student.lm.lm_head.weight)  # the graph's int4 weights
    ln, own_ln = (m.vision_tower.vision_tower.pre_layrnorm.weight for m in (ref, tiny_student))
    assert ln.data_ptr() == own_ln.data_ptr()  # not in the graphs by name: the model's, shared
    assert all(torch.equal(v, before[k]) for k, v in tiny_student.state_dict().items())
