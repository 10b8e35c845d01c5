"""`alignkd-mobile eval`: resumes a killed run to the same scores, writes the report and radar PNG."""

from __future__ import annotations

import json

import pytest

from alignkd.eval.evaluate import evaluate
from alignkd.model import build_model, save_model
from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    tok = load_tokenizer(tiny_tokenizer_dir())
    for name, seed in (("alignkd", 0), ("baseline", 1)):
        save_model(build_model("tiny-student", seed=seed), root / name, tokenizer=tok)
    return root


def test_resume_gives_the_same_scores_and_report(two_checkpoints, tmp_path):
    ckpts = [str(two_checkpoints / "alignkd"), str(two_checkpoints / "baseline")]
    full = evaluate(ckpts, ["easyvqa"], None, tmp_path / "full", limit=6, batch_size=4, max_new_tokens=3,
                    distilled="alignkd", baseline="baseline", progress=False, log=lambda *_: None)
    # a "killed" run: 2 answers written and a torn third line
    part = tmp_path / "part" / "answers" / "alignkd" / "easyvqa.jsonl"
    part.parent.mkdir(parents=True)
    lines = (tmp_path / "full" / "answers" / "alignkd" / "easyvqa.jsonl").read_text().splitlines()
    part.write_text("\n".join(lines[:2]) + '\n{"id": "12", "ans')
    resumed = evaluate(ckpts, ["easyvqa"], None, tmp_path / "part", limit=6, batch_size=4, max_new_tokens=3,
                       distilled="alignkd", baseline="baseline", progress=False, log=lambda *_: None)
    assert resumed == full
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert set(report["metrics"]) == {"alignkd", "baseline"}
    assert (tmp_path / "full" / "report_radar.png").read_bytes()[:4] == b"\x89PNG"
    assert "| alignkd |" in (tmp_path / "full" / "report.md").read_text()


def test_missing_benchmark_files_name_the_expected_path(two_checkpoints, tmp_path):
    from alignkd.errors import DataError

    with pytest.raises(DataError, match="testdev_balanced_questions.json"):
        evaluate([str(two_checkpoints / "alignkd")], ["gqa"], str(tmp_path), tmp_path / "o", progress=False)
