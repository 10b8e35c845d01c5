"""The ExecuTorch target: one .pte (vision_encoder / token_embedding / text_decoder + metadata) that matches
the eager student, built on ExecuTorch's own LLaMA decoder with its custom KV-cache and SDPA ops.

Fast tests export fp32 once (module fixture, ~25 s on an idle 2-core machine); each quantized export is
another ~25–90 s and is marked slow (`pytest -m slow tests/export/test_executorch.py`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from alignkd.errors import ConfigError, DataError
from alignkd.export.base import EagerRuntime, ExportOptions
from alignkd.export.executorch import (
    PTE_NAME, QUANTS, THRESHOLDS, VISION_THRESHOLDS, ExecuTorchTarget, ModuleRuntime, build_modules,
    build_text_decoder, cancel_transpose_pairs, thresholds_for,
)
from alignkd.export.parity import Thresholds, check_parity
from alignkd.export.runtime import generate
from alignkd.model.mobilevlm import IMAGE_TOKEN_INDEX, to_llama_config
from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir

PROMPT = [1, 17, -200, 23, 9, 40]  # 149 positions once the image expands to 144 tokens
MAX_SEQ = 192  # room for the prompt + 16 greedy steps, small enough to export fast

# Lowering alone (artifact vs the same modules, same quantization, in eager PyTorch).
LOWERING_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(),
    # XNNPACK's qd8-f32-qc8w kernels reproduce torchao's int8 simulation (measured rel ~6e-8)
    "8da8w": Thresholds(logits_rel=1e-5),
    # the int8 weights are the same bytes; only the fp32 matmul order differs (measured rel ~2e-7)
    "int8": Thresholds(logits_rel=1e-5),
    # XNNPACK keeps int4 group scales in bf16, torchao's eager path in fp32 (measured rel ~5e-3, top-1 0.94):
    # greedy paths may part once logits are near-ties, as on this random model
    "8da4w": Thresholds(logits_rel=2e-2, top1=0.75, exact_tokens=False),
}


@pytest.fixture(scope="module")
def px():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 48, 48, generator=g)[:1].numpy()  # conftest's `pixels`, module-scoped


@pytest.fixture(scope="module")
def fp32_dir(tiny_student, tmp_path_factory):
    out = tmp_path_factory.mktemp("pte_fp32")
    tokenizer = load_tokenizer(tiny_tokenizer_dir())  # BOS/EOS metadata come from it
    paths = ExecuTorchTarget().export(tiny_student, tokenizer, out, ExportOptions(quant="fp32", max_seq_len=MAX_SEQ))
    assert paths == [out / PTE_NAME]
    return out


def _opts(quant: str = "fp32", **extra) -> ExportOptions:
    return ExportOptions(quant=quant, max_seq_len=MAX_SEQ, extra=extra)


def test_fp32_pte_matches_eager(tiny_student, fp32_dir, px):
    target = ExecuTorchTarget()
    rep = check_parity(target.load(fp32_dir, _opts()), target.reference(tiny_student, _opts()), PROMPT, px, thresholds_for(_opts()))
    assert rep["passed"], rep["failures"]
    # measured: logits rel ~1e-7, image cosine 1 - 2e-14, 16/16 greedy tokens identical
    assert rep["logits_rel"] < 1e-5 and rep["image_cos"] > 0.99999 and rep["greedy_identical"]
    assert rep["embed_max_abs"] == 0.0


def test_metadata_methods(tiny_student, fp32_dir):
    rt = ExecuTorchTarget().load(fp32_dir, _opts())
    t = tiny_student.config.text
    assert rt.metadata == {"max_seq_len": MAX_SEQ, "bos_id": t.bos_token_id, "eos_ids": [t.eos_token_id],
                           "vocab_size": t.vocab_size, "use_kv_cache": True, "enable_dynamic_shape": True}
    names = rt.program.method_names
    assert {"vision_encoder", "token_embedding", "text_decoder", "get_max_context_len"} <= set(names)


def test_loading_prints_nothing_and_keeps_standard_error(fp32_dir, capfd):
    """ExecuTorch's threadpool reset logged six lines of CPU probing to standard error on every load."""
    import sys

    capfd.readouterr()
    ExecuTorchTarget().load(fp32_dir, _opts()).close()
    print("still here", file=sys.stderr, flush=True)  # fd 2 is back where it was
    assert capfd.readouterr().err == "still here\n"


def test_decode_restarts_and_bounds(fp32_dir, tiny_student):
    rt = ExecuTorchTarget().load(fp32_dir, _opts())
    ids = np.arange(3, 13, dtype=np.int64)
    assert rt.embed(ids[:1]).shape == (1, 64)  # a single token: the dynamic dim goes down to 1
    embeds = rt.embed(ids)  # (10, H)
    first = rt.decode(embeds, 0)
    step = rt.decode(rt.embed(np.array([7])), 10)
    again = rt.decode(embeds, 0)  # start 0 = new sequence, whatever the cache held
    np.testing.assert_array_equal(first, again)
    full = tiny_student.lm(inputs_embeds=torch.from_numpy(np.concatenate([embeds, rt.embed(np.array([7]))]))[None]).logits
    np.testing.assert_allclose(step, full[0, -1].detach().numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="cache holds 10"):
        rt.decode(embeds[:1], 12)
    rt.decode(embeds, 0)
    rt.decode(rt.embed(np.array([9, 9, 9])), 10)  # an answer after the prompt ...
    rewound = rt.decode(rt.embed(np.array([7])), 10)  # ... dropped: the next question continues after the prompt
    np.testing.assert_allclose(rewound, step, atol=1e-5)
    with pytest.raises(DataError, match="exceed max_seq_len 192"):
        rt.decode(np.zeros((MAX_SEQ - 5, 64), np.float32), 10)


def _scaled_copy(pte: bytes, weight: torch.Tensor, factor: float) -> bytes:
    """The .pte with one fp32 weight matrix's stored bytes multiplied by `factor`."""
    raw = weight.detach().float().contiguous().numpy().tobytes()
    at = pte.find(raw)
    assert at >= 0 and pte.find(raw, at + 1) < 0, "the weight is not stored verbatim exactly once"
    return pte[:at] + (weight.detach().float().numpy() * factor).astype(np.float32).tobytes() + pte[at + len(raw):]


def test_perturbed_artifact_fails_the_gate(tiny_student, fp32_dir, px, tmp_path):
    w = tiny_student.lm.model.layers[1].mlp.up_proj.weight
    (tmp_path / PTE_NAME).write_bytes(_scaled_copy((fp32_dir / PTE_NAME).read_bytes(), w, 1.5))
    target = ExecuTorchTarget()
    rep = check_parity(target.load(tmp_path, _opts()), target.reference(tiny_student, _opts()), PROMPT, px, thresholds_for(_opts()))
    assert not rep["passed"] and any("relative error" in f for f in rep["failures"])
    assert rep["image_cos"] > 0.99999  # only the decoder was touched


def test_executorch_multimodal_runner_agrees(fp32_dir, px):
    """ExecuTorch's own C++ LLaVA-style runner drives the .pte to the same greedy tokens as our runtime."""
    import sentencepiece as spm
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_text_input

    model_file = tiny_tokenizer_dir() / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    prompt = sp.encode("a") + [IMAGE_TOKEN_INDEX] + sp.encode("b")  # the runner adds no BOS
    ours = generate(ExecuTorchTarget().load(fp32_dir, _opts()), prompt, px, 8, eos_id=2).tokens
    runner = MultimodalRunner(str(fp32_dir / PTE_NAME), str(model_file))
    inputs = [make_text_input("a"), make_image_input(torch.from_numpy(px[0])), make_text_input("b")]
    text = runner.generate_text(inputs, GenerationConfig(max_new_tokens=8, temperature=0.0, echo=False))
    assert text == "".join(sp.id_to_piece(t) for t in ours).replace("\u2581", " ")


def test_eager_modules_match_transformers(tiny_student, px):
    """The ExecuTorch decoder (custom cache + SDPA ops) in eager: the name table, RoPE and norms are right."""
    rep = check_parity(ModuleRuntime(build_modules(tiny_student, _opts()), MAX_SEQ), EagerRuntime(tiny_student),
                       PROMPT, px, thresholds_for(_opts()))
    assert rep["passed"] and rep["logits_rel"] < 1e-5, rep


def test_decoder_handles_gqa_and_rope_theta(tiny_student):
    text = replace(tiny_student.config.text, num_kv_heads=2, rope_theta=500000.0)
    torch.manual_seed(3)
    lm = LlamaForCausalLM(to_llama_config(text)).eval()
    decoder = build_text_decoder(lm, 32)
    x = torch.randn(1, 12, text.hidden_size)
    with torch.no_grad():
        want = lm(inputs_embeds=x).logits[0]  # (12, V)
        got = [decoder(x[:, :9], torch.tensor([0]))[0]] + [decoder(x[:, i:i + 1], torch.tensor([i]))[0] for i in range(9, 12)]
    torch.testing.assert_close(torch.stack(got), want[8:], atol=1e-5, rtol=1e-5)


def test_bad_options_are_config_errors(tiny_student, tmp_path):
    target = ExecuTorchTarget()
    with pytest.raises(ConfigError, match="supported: fp32, 8da4w, 8da8w, int8"):
        target.export(tiny_student, None, tmp_path, _opts("q4_0"))
    with pytest.raises(ConfigError, match="embedding_quant '3'"):
        target.export(tiny_student, None, tmp_path, _opts(embedding_quant="3"))
    with pytest.raises(ConfigError, match=r"vision_quant 'int8' is not supported \(supported: auto, fp32, 8da8w, 8da4w\)"):
        target.export(tiny_student, None, tmp_path, _opts(vision_quant="int8"))
    with pytest.raises(ConfigError, match="unknown option\\(s\\) accuracy_level \\(known: group_size, embedding_quant"):
        target.export(tiny_student, None, tmp_path, _opts(accuracy_level=4))
    with pytest.raises(ConfigError, match="group_size must be an integer, got 'x'"):
        target.export(tiny_student, None, tmp_path, _opts(group_size="x"))
    with pytest.raises(ConfigError, match="model's context of 512"):
        target.export(tiny_student, None, tmp_path, ExportOptions(max_seq_len=4096))
    with pytest.raises(DataError, match="no ExecuTorch program"):
        target.load(tmp_path, _opts())
    assert not list(tmp_path.iterdir())


def test_options_follow_the_lm_quant_unless_given():
    """A quantized LM gets an 8-bit vision encoder (8da8w) and an embedding table of its own weight bits."""
    target = ExecuTorchTarget()
    o = target.options(_opts("8da4w"))
    assert (o.vision_quant, o.embedding_quant, o.group_size) == ("8da8w", "4", 32)
    assert (target.options(_opts("int8")).vision_quant, target.options(_opts("int8")).embedding_quant) == ("8da8w", "8")
    assert (target.options(_opts()).vision_quant, target.options(_opts()).embedding_quant) == ("fp32", "fp32")
    o = target.options(_opts("8da4w", vision_quant="fp32", embedding_quant="8", group_size="64"))  # strings: the CLI's
    assert (o.vision_quant, o.embedding_quant, o.group_size) == ("fp32", "8", 64)


def test_thresholds_cover_every_quant_and_loosen_with_quantized_parts():
    assert set(THRESHOLDS) == set(QUANTS) == set(LOWERING_THRESHOLDS)
    # the fp32 gate: fp32 LM (logits) + fp32 vision encoder (image tokens)
    assert thresholds_for(_opts()) == Thresholds(image_cos=0.9999, image_rel=1e-3, logits_rel=1e-4, top1=1.0)
    t = thresholds_for(_opts("8da8w", embedding_quant="4", vision_quant="fp32"))
    assert t.logits_rel >= THRESHOLDS["8da8w"].logits_rel and not t.exact_tokens
    assert t.image_cos == VISION_THRESHOLDS["fp32"].image_cos  # an fp32 vision encoder keeps the tight image bound
    v = thresholds_for(_opts("8da4w"))  # the android default: 8da8w vision, 4-bit table
    assert v.image_cos == VISION_THRESHOLDS["8da8w"].image_cos and v.image_rel == VISION_THRESHOLDS["8da8w"].image_rel


def test_build_modules_leaves_the_model_untouched(tiny_student):
    """The modules share the model's fp32 tensors until a quantizer replaces them: it must never write into them."""
    before = {k: v.clone() for k, v in tiny_student.state_dict().items()}
    modules = build_modules(tiny_student, _opts("8da4w", vision_quant="8da4w"))
    decoder = modules["text_decoder"].transformer
    assert type(decoder.layers[0].attention.wq.weight) is not torch.nn.Parameter  # replaced by a quantized tensor
    assert decoder.norm.weight.data_ptr() == tiny_student.lm.model.norm.weight.data_ptr()  # shared, not copied
    for k, v in tiny_student.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k


def test_the_vision_program_holds_only_the_clip_layers_that_run(tiny_student):
    """CLIP's last layer never reaches the features (select_layer −2): the exported program does not hold it."""
    modules = build_modules(tiny_student, _opts("fp32"))
    program = torch.export.export(modules["vision_encoder"], (torch.zeros(1, 3, 48, 48),), strict=False)
    layers = {k.split("encoder.layers.")[1].split(".")[0] for k in program.state_dict if "encoder.layers." in k}
    assert layers == {"0", "1"}  # of the tower's 3
    assert len(tiny_student.vision_tower.vision_tower.encoder.layers) == 3


def _export_and_check(model, opts: ExportOptions, out, px, lowering: Thresholds) -> tuple[dict, dict]:
    """Parity of one export against the fp32 eager model (its gate) and against its own eager modules."""
    target = ExecuTorchTarget()
    target.export(model, None, out, opts)
    vs_fp32 = check_parity(target.load(out, opts), target.reference(model, opts), PROMPT, px, thresholds_for(opts))
    vs_same = check_parity(target.load(out, opts), target.quantized_reference(model, opts, out), PROMPT, px, lowering)
    return vs_fp32, vs_same


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["8da4w", "8da8w", "int8"])
def test_quantized_pte(tiny_student, px, tmp_path, quant):
    # the LM alone quantized (vision and table fp32): the lowering bounds are the LM's
    opts = _opts(quant, vision_quant="fp32", embedding_quant="fp32")
    vs_fp32, vs_same = _export_and_check(tiny_student, opts, tmp_path, px, LOWERING_THRESHOLDS[quant])
    assert vs_fp32["passed"], vs_fp32["failures"]
    assert vs_same["passed"], vs_same["failures"]
    assert (tmp_path / PTE_NAME).stat().st_size < 1.3e6  # fp32 is ~1.38 MB, the fp32 vision encoder ~0.8 MB of it


@pytest.mark.slow
@pytest.mark.parametrize("bits", ["8", "4"])
def test_quantized_embedding(tiny_student, px, tmp_path, bits):
    vs_fp32, vs_same = _export_and_check(tiny_student, _opts(embedding_quant=bits), tmp_path, px, Thresholds())
    assert vs_fp32["passed"], vs_fp32["failures"]
    assert vs_same["passed"] and vs_same["embed_max_abs"] < 1e-6, vs_same


@pytest.mark.slow
@pytest.mark.parametrize("vision_quant, image_cos", [
    # XNNPACK's int8 conv-free ViT GEMMs vs torchao's eager simulation: measured image cos 1 - 4e-7, rel 5e-5
    ("8da8w", 0.99999),
    # int4 groups: XNNPACK keeps the group scales in bf16, torchao in fp32: measured image cos 0.999988
    ("8da4w", 0.9999),
])
def test_quantized_vision_encoder(tiny_student, px, tmp_path, vision_quant, image_cos):
    lowering = Thresholds(image_cos=image_cos, image_rel=1e-2, logits_rel=1e-3)
    vs_fp32, vs_same = _export_and_check(tiny_student, _opts(vision_quant=vision_quant), tmp_path, px, lowering)
    assert vs_fp32["passed"], vs_fp32["failures"]
    assert vs_same["passed"], vs_same["failures"]
    assert vs_fp32["image_cos"] < 0.99999  # really quantized: against the fp32 encoder


def test_cancel_transpose_pairs_leaves_no_double_transpose_and_the_same_outputs(tiny_student):
    """5 cancelling pairs per layer (q, k and v on the way into the cache, both caches on the way out); the
    pass keeps the program's outputs (the fp32 parity tests check the lowered program end to end)."""
    decoder = build_text_decoder(tiny_student.lm, 32)
    hidden = tiny_student.config.text.hidden_size
    seq = torch.export.Dim("seq", min=1, max=32)
    x = torch.randn(1, 5, hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        program = torch.export.export(decoder, (torch.zeros(1, 4, hidden), torch.tensor([0])),
                                      dynamic_shapes=({1: seq}, None), strict=True)
        want = program.module()(x, torch.tensor([0]))
        assert cancel_transpose_pairs(program) == 5 * tiny_student.config.text.num_layers
        got = program.module()(x, torch.tensor([0]))
    transpose = torch.ops.aten.transpose.int
    assert not [n for n in program.graph_module.graph.nodes
                if n.target == transpose and getattr(n.args[0], "target", None) == transpose]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_vision_program_has_no_softmax_guards_and_the_model_keeps_its_attention(tiny_student, px):
    """SDPA decomposes into a safe softmax whose guards (eq, any, logical_not, where) XNNPACK does not take;
    the exported encoder uses CLIP's eager attention instead, with the same image tokens, and only on its
    copy: the model (and training) keeps SDPA."""
    modules = build_modules(tiny_student, _opts("8da4w", vision_quant="fp32"))
    program = torch.export.export(modules["vision_encoder"], (torch.zeros(1, 3, 48, 48),), strict=False)
    ops = {str(n.target) for n in program.run_decompositions().graph.nodes if n.op == "call_function"}
    assert "aten._softmax.default" in ops
    assert not ops & {"aten.where.self", "aten.any.dim", "aten.logical_not.default", "aten.eq.Scalar"}, ops
    assert tiny_student.vision_tower.vision_tower.config._attn_implementation == "sdpa"
    x = torch.from_numpy(px).float()
    with torch.no_grad():
        torch.testing.assert_close(modules["vision_encoder"](x), tiny_student.encode_images(x), rtol=1e-5, atol=1e-5)
