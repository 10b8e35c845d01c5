"""Desktop-emulator parity on trained tiny students (distilled and baseline), every format.

fp32 bundles give the eager model's greedy tokens exactly (GGUF: its llama.cpp-semantics reference, see
DESIGN.md §3); quantized bundles keep teacher-forced top-1 agreement (the export gate) and easy-vqa
accuracy within ACCURACY_BOUND points of eager. The students are trained briefly with the embedded recipe.
"""

from __future__ import annotations

import pytest

from alignkd.eval.benchmarks import get_benchmark
from alignkd.eval.runner import answer_items
from alignkd.export.base import ExportOptions, get_target
from alignkd.export.emulator import BundleRunner
from alignkd.export.exporter import export_bundle
from alignkd.export.runtime import generate
from alignkd.model import load_model
from alignkd.model.tokenizer import load_tokenizer
from alignkd.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow  # trains two students and exports 12 artifacts: a few minutes

N_ITEMS = 40
ACCURACY_BOUND = {"fp32": 0.0, "8da4w": 10.0, "int4": 10.0, "q4_0": 10.0}  # points vs eager (GGUF: vs its reference)
GGUF_FP32_BOUND = 20.0  # the llama.cpp class-token fault against the faithful model (measured and printed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run_demo(DemoConfig(output_dir=str(root), teacher_steps=80, student_steps=60, eval_limit=20, progress=False))
    return root


@pytest.fixture(scope="module")
def bundles(trained, tmp_path_factory):
    out = {}
    for student in ("baseline", "alignkd"):
        b = tmp_path_factory.mktemp("bundles") / student
        export_bundle(trained / student, b, ["pte", "onnx", "gguf"], ["fp32", "8da4w", "int4", "q4_0"],
                      target="desktop", log=lambda *_: None)
        out[student] = b
    return out


@pytest.mark.parametrize("student", ["baseline", "alignkd"])
def test_every_format_matches_eager(trained, bundles, student):
    model, tok = load_model(trained / student), load_tokenizer(trained / student)
    bench = get_benchmark("easyvqa")
    items, _ = bench.load(None, limit=N_ITEMS)
    eager_preds = answer_items(model, tok, items, batch_size=20, max_new_tokens=6, progress=False)
    eager_acc = bench.score(items, eager_preds)["accuracy"]
    rows = []
    for art in ("pte/fp32", "onnx/fp32", "gguf/fp32", "pte/8da4w", "onnx/int4", "gguf/q4_0"):
        fmt, quant = art.split("/")
        runner = BundleRunner(bundles[student], fmt, quant, threads=1)
        if quant == "fp32":
            ref_rt = get_target(fmt).reference(model, ExportOptions())  # eager (GGUF: llama.cpp semantics)
            for it in items[:8]:
                ids, px = runner.prompt_ids(it.question), runner.pixels(it.image)
                want = generate(ref_rt, ids, px, 6, runner.eos_ids[0]).tokens
                assert runner.answer(it.image, it.question, max_new_tokens=6).tokens == want, (art, it.id)
        preds = {it.id: runner.answer(it.image, it.question, max_new_tokens=6).text for it in items}
        runner.close()
        acc = bench.score(items, preds)["accuracy"]
        rows.append((art, acc))
        bound = GGUF_FP32_BOUND if art == "gguf/fp32" else ACCURACY_BOUND[quant]
        if art in ("pte/fp32", "onnx/fp32"):
            assert preds == eager_preds, art  # identical answers, not only the same score
        assert abs(acc - eager_acc) <= bound, (art, acc, eager_acc)
    print(f"\n{student}: eager {eager_acc:.1f}% | " + " | ".join(f"{a} {x:.1f}%" for a, x in rows))
