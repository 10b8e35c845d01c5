"""`eval` of an exported bundle: it answers through the emulator, as the phone does, and is scored beside the
checkpoint it came from; its answers are stamped with the bundle and the artifact, and never mixed with another's."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from click.testing import CliRunner

from alignkd.cli import main
from alignkd.errors import ConfigError
from alignkd.eval.evaluate import evaluate
from alignkd.export.exporter import export_bundle


@pytest.fixture(scope="module")
def pair(ckpt, tmp_path_factory):
    """(checkpoint, its fp32 ONNX + GGUF bundle), folders of one name (student): the bundle's run is named with
    its artifact (student-onnx-fp32)."""
    bundle = tmp_path_factory.mktemp("bundles") / "student"
    export_bundle(ckpt, bundle, ["onnx", "gguf"], ["fp32"], target="desktop", log=lambda *_: None)
    return ckpt, bundle


def _answers(out, run):
    return {json.loads(x)["question_id"]: json.loads(x)["text"]
            for x in (out / "answers" / run / "easyvqa.jsonl").read_text().splitlines()}


def test_a_bundle_answers_as_its_checkpoint_and_is_scored_beside_it(pair, tmp_path):
    ckpt, bundle = pair
    out = tmp_path / "eval"
    r = CliRunner().invoke(main, ["eval", str(ckpt), str(bundle), "--limit", "12", "--max-new-tokens", "4",
                                  "--output-dir", str(out), "--distilled", "student-onnx-fp32", "--baseline", str(ckpt)])
    assert r.exit_code == 0, r.output
    eager, phone = _answers(out, "student"), _answers(out, "student-onnx-fp32")
    assert len(eager) == 12 and phone == eager  # fp32 ONNX: the eager model's greedy tokens
    stamp = json.loads((out / "answers" / "student-onnx-fp32" / "model.json").read_text())
    assert stamp["artifact"] == "onnx/fp32" and "dtype" not in stamp
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"student", "student-onnx-fp32"}
    assert report["metrics"]["student"]["easyvqa"]["accuracy"] == report["metrics"]["student-onnx-fp32"]["easyvqa"]["accuracy"]


def test_each_artifact_is_its_own_run_and_a_missing_one_is_named(pair, tmp_path):
    _, bundle = pair
    out = tmp_path / "eval"
    args = ["eval", str(bundle), "--limit", "3", "--max-new-tokens", "2", "--output-dir", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    before = (out / "answers" / "student-onnx-fp32" / "easyvqa.jsonl").read_bytes()
    r = CliRunner().invoke(main, [*args, "--artifact", "gguf/fp32"])  # into the same folder: never mixed in
    assert r.exit_code == 0, r.output
    assert (out / "answers" / "student-onnx-fp32" / "easyvqa.jsonl").read_bytes() == before
    assert json.loads((out / "answers" / "student-gguf-fp32" / "model.json").read_text())["artifact"] == "gguf/fp32"
    assert len(_answers(out, "student-gguf-fp32")) == 3
    r = CliRunner().invoke(main, [*args, "--output-dir", str(tmp_path / "other"), "--artifact", "pte/8da4w"])
    assert r.exit_code == 2 and r.stderr == (
        f"error: --artifact pte/8da4w: bundle {bundle} has no such artifact (it has: onnx/fp32, gguf/fp32)\n")
    assert not (tmp_path / "other").exists()


def test_a_damaged_bundle_is_refused_before_any_answer(pair, tmp_path):
    _, bundle = pair
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    with (bad / "tokenizer" / "tokenizer.model").open("ab") as f:
        f.write(b"x")
    r = CliRunner().invoke(main, ["eval", str(bad), "--limit", "2", "--output-dir", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.stderr.startswith(f"error: bundle {bad}: tokenizer/tokenizer.model has size ")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="is an exported bundle: `alignkd-mobile eval` answers with one through"):
        evaluate([str(bundle)], ["easyvqa"], None, tmp_path / "api", limit=2, log=lambda *_: None)  # no open_bundle


def test_a_question_beyond_the_bundles_context_is_left_unanswered_and_scored_wrong(pair, tmp_path):
    _, bundle = pair
    out = tmp_path / "eval"
    # 144 image tokens + the prompt + 400 new tokens do not fit the bundle's 512 positions: on the phone neither
    r = CliRunner().invoke(main, ["eval", str(bundle), "--limit", "3", "--max-new-tokens", "400", "--output-dir",
                                  str(out)])
    assert r.exit_code == 0, r.output
    assert r.stderr.count("warning: bundle") == 1 and "needs more than its max_seq_len 512 with --max-new-tokens 400: " \
        "left unanswered, scored wrong" in r.stderr
    m = json.loads((out / "report.json").read_text())["metrics"]["student-onnx-fp32"]["easyvqa"]
    assert (m["n"], m["n_missing"], m["accuracy"]) == (3, 3, 0.0)
    assert (out / "answers" / "student-onnx-fp32" / "easyvqa.jsonl").read_text() == ""


def test_a_bundle_without_artifacts_is_one_error(pair, tmp_path):
    _, bundle = pair
    empty = tmp_path / "empty"
    shutil.copytree(bundle, empty)
    m = json.loads((empty / "manifest.json").read_text())
    m["artifacts"] = []
    (empty / "manifest.json").write_text(json.dumps(m))
    r = CliRunner().invoke(main, ["eval", str(empty), "--limit", "2", "--output-dir", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.stderr == f"error: bundle {empty} holds no artifact: export it again\n", r.output


def test_a_checkpoints_eval_needs_no_export_stack(ckpt, tmp_path, monkeypatch):
    # the GPU image runs `eval` from the repository without the package installed: alignkd.export is not there
    for name in [n for n in sys.modules if n == "alignkd.export" or n.startswith("alignkd.export.")] + ["alignkd.export"]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of it fails
    monkeypatch.delitem(sys.modules, "alignkd.bundle_answers", raising=False)
    r = CliRunner().invoke(main, ["eval", str(ckpt), "--limit", "2", "--max-new-tokens", "2", "--output-dir",
                                  str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
