"""GGUF target: the files hold what llama.cpp expects, llama.cpp matches the llama.cpp-semantics reference per
quant and mmproj quant, a broken artifact fails the gate, the upstream class-token fault is measured, a full
disk is one error naming the file, and llama.cpp's own prompt / chat path produces the greedy tokens of our
Runtime path."""

from __future__ import annotations

import codecs
import copy
import dataclasses

import numpy as np
import torch
import pytest
import sentencepiece as spm
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from PIL import Image

from alignkd.data.image import ImageProcessingConfig, preprocess
from alignkd.data.templates import build_prompt
from alignkd.data.tokenize import tokenize_prompt
from alignkd.errors import ConfigError, DataError
from alignkd.export.base import ExportOptions
from alignkd.export.gguf.names import lm_names, permute_qk, unpermute_qk, vision_layers_run, vision_names
from alignkd.export.gguf.reference import llamacpp_image_features
from alignkd.export.gguf.runtime import to_uint8_image
from alignkd.export.gguf.target import VISION_THRESHOLDS, GgufTarget, faithful_divergence
from alignkd.export.parity import check_parity, gate
from alignkd.export.runtime import generate
from alignkd.fileio import DiskFull
from alignkd.model import MobileVLM
from alignkd.model.tokenizer import PROBES, load_tokenizer, tiny_tokenizer_dir
from llamacpp_native import chat_v1, generate_native

PROMPT = [1, 17, -200, 23, 9, 40]
QUESTION = "What shape is in the image?"


def _opts(quant: str, **extra) -> ExportOptions:
    # one llama.cpp thread: its spinning worker threads crawl when the two cores are shared with other tests
    return ExportOptions(quant=quant, threads=1, extra=extra)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_tokenizer_dir())


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)  # (S, S, 3) RGB


@pytest.fixture(scope="module")
def px(image):
    # through the project's own preprocessing, as real inputs arrive
    return preprocess(Image.fromarray(image), ImageProcessingConfig(image_size=48))[None].numpy()  # (1, 3, S, S)


@pytest.fixture(scope="module")
def fp32_dir(tiny_student, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf_fp32")
    GgufTarget().export(tiny_student, tokenizer, out, _opts("fp32"))
    return out


@pytest.fixture(scope="module")
def fp32_runtime(fp32_dir):
    rt = GgufTarget().load(fp32_dir, _opts("fp32"))
    yield rt
    rt.close()


def _fields(path):
    reader = GGUFReader(path)
    keys = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return keys, {t.name: t.tensor_type for t in reader.tensors}


def test_mmproj_holds_exactly_the_keys_and_tensors_llamacpp_reads(fp32_dir, tiny_student):
    keys, tensors = _fields(fp32_dir / "mmproj-f32.gguf")
    v = tiny_student.config.vision
    assert keys["general.architecture"] == "clip" and keys["clip.projector_type"] == "ldpv2"
    assert [keys[f"clip.has_{k}"] for k in ("text_encoder", "vision_encoder", "llava_projector")] == [False, True, True]
    assert keys["clip.use_gelu"] is False  # quick-GELU
    assert keys["clip.vision.block_count"] == v.num_layers == 3  # llama.cpp runs 2 = hidden layer −2
    assert [keys[f"clip.vision.{k}"] for k in ("image_size", "patch_size", "embedding_length")] == [48, 2, 64]
    np.testing.assert_allclose(keys["clip.vision.image_mean"], v.image_mean, rtol=1e-7)
    np.testing.assert_allclose(keys["clip.vision.image_std"], v.image_std, rtol=1e-7)
    layer = {f"v.blk.{i}.{n}.{p}" for i in range(3) for n in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2",
                                                                 "ffn_up", "ffn_down") for p in ("weight", "bias")}
    assert set(tensors) == layer | {
        "v.patch_embd.weight", "v.class_embd", "v.position_embd.weight", "v.pre_ln.weight", "v.pre_ln.bias",
        "mm.model.mlp.0.weight", "mm.model.mlp.0.bias", "mm.model.mlp.2.weight", "mm.model.mlp.2.bias",
        "mm.model.peg.0.weight", "mm.model.peg.0.bias"}
    assert tensors["mm.model.peg.0.weight"] == T.F16 and tensors["v.patch_embd.weight"] == T.F16
    assert tensors["v.blk.0.attn_q.weight"] == T.F32 and tensors["v.position_embd.weight"] == T.F32


def test_lm_gguf_metadata_vocabulary_and_name_tables(fp32_dir, tiny_student):
    keys, tensors = _fields(fp32_dir / "model-f32.gguf")
    t = tiny_student.config.text
    assert keys["general.architecture"] == "llama" and keys["llama.context_length"] == 512
    hparams = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "rope.dimension_count")
    assert [keys[f"llama.{k}"] for k in hparams] == [64, 2, 176, 4, 4, 16]
    assert keys["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(t.rms_norm_eps)
    assert keys["tokenizer.ggml.model"] == "llama" and keys["tokenizer.ggml.add_bos_token"] is True
    assert [keys[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")] == [1, 2, 0, 0]
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir() / "tokenizer.model"))
    assert keys["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert len(tensors) == 3 + 9 * t.num_layers
    # every weight of the model is exported, except CLIP's post-layernorm, which hidden layer −2 never reaches
    mapped = {ours for ours, _ in lm_names(tiny_student) + vision_names(tiny_student)}
    left = set(tiny_student.state_dict()) - mapped
    assert left == {"vision_tower.vision_tower.post_layernorm.weight", "vision_tower.vision_tower.post_layernorm.bias"}


def test_qk_permutation_is_invertible():
    w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    assert not np.array_equal(permute_qk(w, 4), w)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 4), 4), w)


def test_llamacpp_tokenizes_like_sentencepiece(fp32_runtime):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir() / "tokenizer.model"))
    for text in PROBES + (build_prompt("v1", QUESTION).split("<image>")[0],):
        assert fp32_runtime.llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text), text


def test_pixels_round_trip_to_the_uint8_bitmap(px, image, tiny_student):
    v = tiny_student.config.vision
    np.testing.assert_array_equal(to_uint8_image(px, v.image_mean, v.image_std), image)


def test_fp32_matches_the_llamacpp_semantics_reference(fp32_runtime, tiny_student, px):
    ref = GgufTarget().reference(tiny_student, _opts("fp32"))
    rep = check_parity(fp32_runtime, ref, PROMPT, px, GgufTarget().thresholds(_opts("fp32")))
    assert rep["passed"], rep["failures"]
    assert rep["greedy_identical"] and rep["embed_max_abs"] == 0.0
    assert rep["logits_rel"] < 1e-5 and rep["image_cos"] > 0.999999  # measured 1.2e-6, 1 − 4e-10


@pytest.mark.parametrize("quant", ["fp16", "q8_0", "q4_0", "q4_k_m"])
def test_quantized_gguf_passes_its_thresholds(quant, tiny_student, tokenizer, px, tmp_path):
    target, opts = GgufTarget(), _opts(quant)
    lm_file, mm_file = target.export(tiny_student, tokenizer, tmp_path, opts)
    _, types = _fields(lm_file)
    if quant != "fp16":
        assert types["blk.0.attn_q.weight"] not in (T.F32, T.F16)  # really quantized
        assert mm_file.name == "mmproj-q8_0.gguf" and _fields(mm_file)[1]["v.blk.0.ffn_up.weight"] == T.Q8_0
    assert types["output_norm.weight"] == T.F32
    if quant in ("q8_0", "q4_0"):
        assert types["blk.0.ffn_down.weight"] == T.F16  # rows of 176 are not a multiple of the 32-block
    rep = gate(target, tiny_student, tmp_path, opts, PROMPT, px)
    assert rep["passed"], rep["failures"]


@pytest.mark.parametrize("vision_quant, stored, image_cos", [("fp16", T.F16, 0.99999), ("q8_0", T.Q8_0, 0.9999)])
def test_mmproj_quant_is_gated_against_the_fp32_encoder(vision_quant, stored, image_cos, tiny_student, tokenizer, px,
                                                        fp32_runtime, tmp_path):
    """An F32 LM beside an F16 / Q8_0 mmproj: its image tokens against the fp32 encoder (llama.cpp semantics)."""
    target, opts = GgufTarget(), _opts("fp32", vision_quant=vision_quant)
    _, mm_file = target.export(tiny_student, tokenizer, tmp_path, opts)
    assert _fields(mm_file)[1]["v.blk.0.attn_q.weight"] == stored
    assert target.thresholds(opts).image_cos == VISION_THRESHOLDS[vision_quant].image_cos
    rep = gate(target, tiny_student, tmp_path, opts, PROMPT, px)
    assert rep["passed"], rep["failures"]
    exact = check_parity(fp32_runtime, target.reference(tiny_student, _opts("fp32")), PROMPT, px,
                         target.thresholds(_opts("fp32")))
    # measured: F16 cos 1 − 1e-7, rel 3e-4; Q8_0 cos 0.99997, rel 8e-3 (the F32 mmproj: rel 3e-5)
    assert image_cos < rep["image_cos"] < 1.0 and rep["image_rel"] > 3 * exact["image_rel"]


def test_reference_shares_but_never_writes_the_model(tiny_student):
    before = {k: v.clone() for k, v in tiny_student.state_dict().items()}
    ref = GgufTarget().reference(tiny_student, _opts("q4_0"))
    assert not torch.equal(ref.model.lm.model.layers[0].mlp.up_proj.weight, tiny_student.lm.model.layers[0].mlp.up_proj.weight)
    assert ref.model.lm.model.norm.weight.data_ptr() == tiny_student.lm.model.norm.weight.data_ptr()  # F32: shared
    assert all(torch.equal(v, before[k]) for k, v in tiny_student.state_dict().items())


def test_k_quants_on_a_256_wide_lm(tiny_student, tokenizer, px, tmp_path):
    """The tiny student's 64-wide rows fall back to Q5_0/Q8_0 under q4_k_m; 256-wide rows get the real mix."""
    t = tiny_student.config.text
    torch.manual_seed(0)
    wide = dataclasses.replace(t, hidden_size=256, intermediate_size=512)
    model = MobileVLM(tiny_student.config.replace(text=wide)).eval()
    target, opts = GgufTarget(), _opts("q4_k_m")
    lm_file, _ = target.export(model, tokenizer, tmp_path, opts)
    types = _fields(lm_file)[1]
    assert (types["token_embd.weight"], types["blk.0.attn_q.weight"], types["output.weight"]) == (T.Q4_K, T.Q4_K, T.Q6_K)
    rep = gate(target, model, tmp_path, opts, PROMPT, px)
    assert rep["passed"], rep["failures"]


def test_a_broken_artifact_fails_the_gate(tiny_student, tokenizer, px, tmp_path):
    target, opts = GgufTarget(), _opts("fp32")
    lm_file, _ = target.export(tiny_student, tokenizer, tmp_path, opts)
    reader = GGUFReader(lm_file, "r+")
    w = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    w.data[...] *= 1.5  # written through the memory map
    del reader, w
    rt = target.load(tmp_path, opts)
    try:
        rep = check_parity(rt, target.reference(tiny_student, opts), PROMPT, px, target.thresholds(opts))
    finally:
        rt.close()
    assert not rep["passed"] and any("relative error" in f for f in rep["failures"])


def test_a_wrong_block_scale_fails_the_4bit_gate(tiny_student, tokenizer, px, tmp_path):
    """The 4-bit gate is loose (docs/parity_gates.md: it catches gross faults only); a scale of the wrong sign
    in one matrix's q4_0 blocks — a lowering fault that keeps every shape — is one it must catch."""
    target, opts = GgufTarget(), _opts("q4_0")
    lm_file, _ = target.export(tiny_student, tokenizer, tmp_path, opts)
    rt = target.load(tmp_path, opts)
    try:  # the untouched file passes: the failure below is the fault's
        assert check_parity(rt, target.reference(tiny_student, opts), PROMPT, px, target.thresholds(opts))["passed"]
    finally:
        rt.close()
    reader = GGUFReader(lm_file, "r+")
    w = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")  # (ffn_down's 176-wide rows stay f16)
    assert w.tensor_type == T.Q4_0
    blocks = w.data.reshape(-1, 18)  # q4_0: an fp16 scale, then 32 weights in 16 bytes of nibbles
    blocks[:, 1] ^= 0x80  # the sign bit of every block's scale (little-endian fp16), through the memory map
    del reader, w, blocks
    rt = target.load(tmp_path, opts)
    try:
        rep = check_parity(rt, target.reference(tiny_student, opts), PROMPT, px, target.thresholds(opts))
    finally:
        rt.close()
    assert not rep["passed"] and any("relative error" in f for f in rep["failures"]), rep


def test_reference_reorders_tokens_as_llamacpp_does(tiny_student, px):
    """Without position embeddings attention cannot tell the order: llama.cpp's rows are then exactly the
    faithful patches 1..575 followed by the class token (patch 0 lost)."""
    model = copy.deepcopy(tiny_student)
    clip = model.vision_tower.vision_tower
    with torch.no_grad():
        clip.embeddings.position_embedding.weight.zero_()
        x = torch.from_numpy(px)
        faithful = clip(x, output_hidden_states=True).hidden_states[-2]  # (1, 577, D): class, patches 0..575
        ours = llamacpp_image_features(clip, x, vision_layers_run(model))  # (1, 576, D)
    torch.testing.assert_close(ours[:, :575], faithful[:, 2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[:, 575], faithful[:, 0], atol=1e-5, rtol=1e-5)


def test_faithful_divergence_measures_the_upstream_class_token_fault(fp32_runtime, fp32_dir, tiny_student, px):
    div = faithful_divergence(tiny_student, fp32_runtime, PROMPT, px)
    assert div["image_cos"] < 0.99  # measured 0.918: patch 0 lost, grid shifted by one
    assert {"logits_rel", "top1_agreement", "greedy_identical", "greedy_reference", "greedy_artifact"} <= set(div)
    report = gate(GgufTarget(), tiny_student, fp32_dir, _opts("fp32"), PROMPT, px)
    assert report["passed"] and report["faithful_divergence"]["image_cos"] == pytest.approx(div["image_cos"])


def test_llamacpp_own_prompt_and_chat_paths_give_our_greedy_tokens(fp32_runtime, fp32_dir, tokenizer, image, px):
    prompt = build_prompt("v1", QUESTION)
    ours = generate(fp32_runtime, tokenize_prompt(prompt, tokenizer), px, 12, eos_id=2).tokens
    assert generate_native(fp32_runtime, prompt, image, 12, eos_id=2) == ours
    # byte-fallback tokens of a random model: compare the text of the longest prefix that ends on a whole
    # character (llama-cpp-python treats a dangling UTF-8 lead byte at the end in its own way)
    n = max(i for i in range(len(ours) + 1) if _ends_whole(fp32_runtime.llm.detokenize(ours[:i])))
    assert n >= len(ours) - 3
    text = chat_v1(fp32_dir, QUESTION, image, _opts("f32"), max_new_tokens=n)
    assert text == fp32_runtime.llm.detokenize(ours[:n]).decode("utf-8", errors="ignore")


def _ends_whole(data: bytes) -> bool:
    """No incomplete UTF-8 sequence is pending at the end of `data`."""
    dec = codecs.getincrementaldecoder("utf-8")("ignore")
    dec.decode(data, final=False)
    return dec.getstate()[0] == b""


def test_bad_requests_raise_user_errors(tiny_student, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="supported: fp32, fp16, q8_0, q4_0, q4_k_m"):
        GgufTarget().export(tiny_student, tokenizer, tmp_path, _opts("int4"))
    with pytest.raises(ConfigError, match="vision_quant 'int8' is not supported \\(supported: fp32, fp16, q8_0"):
        GgufTarget().export(tiny_student, tokenizer, tmp_path, _opts("q4_0", vision_quant="int8"))
    with pytest.raises(ConfigError, match="max_seq_len 513 must be between 145 .* context of 512"):
        GgufTarget().export(tiny_student, tokenizer, tmp_path, ExportOptions(quant="q4_0", max_seq_len=513))
    with pytest.raises(ConfigError, match="tokenizer.model"):
        GgufTarget().export(tiny_student, tmp_path, tmp_path, _opts("fp32"))
    with pytest.raises(DataError, match="not found"):
        GgufTarget().load(tmp_path, _opts("q8_0"))
    assert not list(tmp_path.iterdir())


def test_full_disk_while_writing_is_one_error_naming_the_file(tiny_student, tokenizer, tmp_path, monkeypatch):
    """gguf-py writes tensors with numpy's tofile, which reports a full disk as a short write without errno."""
    import gguf

    def short_write(self, *a, **k):
        raise OSError("262144 requested and 4096 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short_write)
    with pytest.raises(DiskFull, match=f"disk full while writing {tmp_path / 'mmproj-f32.gguf'}"):
        GgufTarget().export(tiny_student, tokenizer, tmp_path, _opts("fp32"))
