"""Without matplotlib (an image built by hand may lack it) a report is written without its figure, with one
warning, and an earlier run's figure beside it is removed (it would show other numbers)."""

from __future__ import annotations

import json
import sys

from alignkd import bench
from alignkd.eval import report
from tests.test_bench import ROW
from tests.eval.test_report import results


def _without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # its import fails


def test_bench_writes_its_numbers_without_a_chart(tmp_path, monkeypatch, capsys):
    out = tmp_path / "b"
    bench.write_outputs([dict(ROW, decode_tok_s=10.0)], out)  # an earlier run, with its chart
    _without_matplotlib(monkeypatch)
    paths = bench.write_outputs([ROW], out)
    assert set(paths) == {"json", "markdown"} and json.loads(paths["json"].read_text())["rows"] == [ROW]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md"]
    assert capsys.readouterr().err == f"warning: matplotlib is not installed: {out / 'bench.png'} is not drawn\n"


def test_eval_writes_its_report_without_the_radar(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    report.write_report(results(), out, distilled="alignkd", baseline="mvlm2-1.7b")
    _without_matplotlib(monkeypatch)
    paths = report.write_report(results(), out, distilled="alignkd", baseline="mvlm2-1.7b")
    assert set(paths) == {"json", "markdown"} and "| Δ alignkd" in paths["markdown"].read_text()
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    assert capsys.readouterr().err == f"warning: matplotlib is not installed: {out / 'report_radar.png'} is not drawn\n"
