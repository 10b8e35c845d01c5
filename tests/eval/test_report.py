"""Comparison report: table, paper average, difference row, radar PNG, atomic writes."""

import json
import os

import pytest

from alignkd.errors import ConfigError
from alignkd.eval import report

# The Align-KD paper's "long subset" numbers (MVLM2 1.7B baseline -> + Align-KD), as metrics dicts.
BASE = {"gqa": 58.9, "sqa": 64.5, "textvqa": 52.2, "pope": 86.1, "mme": 1289.2, "mmbench": 55.9}
KD = {"gqa": 60.1, "sqa": 67.7, "textvqa": 53.1, "pope": 87.0, "mme": 1303.8, "mmbench": 57.5}


def results():
    return {
        "mvlm2-1.7b": {b: {"score": v, "n": 10.0} for b, v in BASE.items()} | {"easyvqa": {"score": 40.0}},
        "alignkd": {b: {"score": v} for b, v in KD.items()} | {"easyvqa": {"score": 45.5}},
    }


def test_build_report_average_and_difference():
    rep = report.build_report(results(), distilled="alignkd", baseline="mvlm2-1.7b")
    assert rep["benchmarks"] == ["gqa", "sqa", "textvqa", "pope", "mme", "mmbench", "easyvqa"]
    assert rep["average_over"] == ["gqa", "sqa", "textvqa", "pope", "mme", "mmbench"]
    # baseline: (58.9 + 64.5 + 52.2 + 86.1 + 1289.2/20 + 55.9) / 6 = (58.9+64.5+52.2+86.1+64.46+55.9)/6
    #         = 382.06 / 6 = 63.6767 (easy-vqa not averaged)
    assert rep["average"]["mvlm2-1.7b"] == pytest.approx(382.06 / 6)
    # distilled: (60.1 + 67.7 + 53.1 + 87.0 + 65.19 + 57.5) / 6 = 390.59 / 6 = 65.0983
    assert rep["average"]["alignkd"] == pytest.approx(390.59 / 6)
    d = rep["difference"]
    assert d["scores"]["mme"] == pytest.approx(14.6)  # raw MME difference, not /20
    assert d["scores"]["gqa"] == pytest.approx(1.2)
    assert d["scores"]["easyvqa"] == pytest.approx(5.5)
    assert d["average"] == pytest.approx(8.53 / 6)  # 1.4217
    json.dumps(rep)  # JSON-able


def test_markdown():
    md = report.render_markdown(report.build_report(results(), distilled="alignkd", baseline="mvlm2-1.7b"))
    lines = md.splitlines()
    assert lines[0] == "| checkpoint | GQA | SQA-I | TextVQA | POPE | MME-P | MMB-dev | easy-vqa | Avg¹ |"
    assert "| mvlm2-1.7b | 58.9 | 64.5 | 52.2 | 86.1 | 1289.2 | 55.9 | 40.0 | 63.7 |" in lines
    assert "| alignkd | 60.1 | 67.7 | 53.1 | 87.0 | 1303.8 | 57.5 | 45.5 | 65.1 |" in lines
    assert "| Δ alignkd − mvlm2-1.7b | +1.2 | +3.2 | +0.9 | +0.9 | +14.6 | +1.6 | +5.5 | +1.4 |" in lines
    assert any(ln.startswith("¹ ") and "divided by 20" in ln and "easy-vqa not averaged" in ln for ln in lines)


def test_missing_benchmark_and_no_difference():
    r = results()
    del r["alignkd"]["pope"]
    rep = report.build_report(r)
    assert rep["difference"] is None
    assert rep["scores"]["alignkd"]["pope"] is None
    assert rep["average"]["alignkd"] is None  # lacks a paper benchmark -> no average
    md = report.render_markdown(rep)
    assert "| alignkd | 60.1 | 67.7 | 53.1 | – |" in md
    # only some paper benchmarks: the footnote says which are missing
    rep = report.build_report({"a": {"gqa": {"score": 50.0}, "mme": {"score": 1000.0}}})
    assert rep["average"]["a"] == pytest.approx((50 + 1000 / 20) / 2)
    assert "SQA-I" in rep["notes"][0]


def test_bad_names():
    with pytest.raises(ConfigError, match="'nope'"):
        report.build_report(results(), distilled="nope", baseline="alignkd")
    with pytest.raises(ConfigError, match="both"):
        report.build_report(results(), distilled="alignkd")
    with pytest.raises(ConfigError):
        report.build_report({})


def test_write_report(tmp_path):
    paths = report.write_report(results(), tmp_path / "out", distilled="alignkd", baseline="mvlm2-1.7b")
    assert set(paths) == {"markdown", "json", "radar"}
    assert paths["radar"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data["metrics"]["mvlm2-1.7b"]["gqa"]["n"] == 10.0
    assert data["difference"]["distilled"] == "alignkd"
    assert "| Δ alignkd" in paths["markdown"].read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md", "report_radar.png"]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    report.atomic_write(target, "old\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        report.atomic_write(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # temp file removed


def test_rules_sources_and_coverage():
    r = {"a": {"pope": {"score": 85.0, "n": 12.0, "n_missing": 1.0, "n_unknown_ids": 2.0, "n_malformed_rows": 0.0}}}
    info = {"pope": {"rule": "mean F1 of the three splits", "source": "/data/pope/coco", "notes": []}}
    rep = report.build_report(r, info=info)
    assert rep["rules"] == {"pope": "mean F1 of the three splits"}
    assert rep["coverage"] == {"a": {"pope": {"n": 12.0, "n_missing": 1.0, "n_unknown_ids": 2.0, "n_malformed_rows": 0.0}}}
    md = report.render_markdown(rep)
    assert "- POPE: mean F1 of the three splits (data: /data/pope/coco)" in md
    assert "| a | POPE | 12 | 1 | 2 | 0 |" in md
    json.dumps(rep)


def test_png_is_written_first(tmp_path, monkeypatch):
    order = []
    real = report.atomic_write
    monkeypatch.setattr(report, "atomic_write", lambda path, data: (order.append(path.name), real(path, data)))
    report.write_report(results(), tmp_path)
    assert order == ["report_radar.png", "report.json", "report.md"]


@pytest.mark.parametrize("fails, left", [("report_radar.png", []), ("report.json", ["report_radar.png"])])
def test_a_full_disk_never_leaves_a_report_without_its_plot(tmp_path, monkeypatch, fails, left):
    real = report.atomic_write

    def write(path, data):
        if path.name == fails:
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(report, "atomic_write", write)
    with pytest.raises(OSError):
        report.write_report(results(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == left  # never report.md without the rest
