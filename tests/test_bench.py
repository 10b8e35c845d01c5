"""`alignkd-mobile bench` / `run`: the host and the app report the same fields, the report never lacks its
chart, bad options are one `error:` line, and the export package does not reach up into eval."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alignkd import bench
from alignkd.errors import DataError
from alignkd.fileio import DiskFull

REPO = Path(__file__).resolve().parents[1]
KOTLIN_BENCHMARK = REPO / "android_demo/core/src/main/kotlin/org/alignkd/core/Benchmark.kt"
ROW = {"bundle": "b", "format": "pte", "quant": "8da4w", "n_runs": 3, "load_s": 0.5, "image_encode_s": 0.2,
       "ttft_s": 0.6, "ttft_warm_s": 0.4, "prefill_tok_s": 400.0, "decode_tok_s": 30.0, "peak_rss_mb": 900.0}


def test_host_and_app_report_the_same_fields_in_the_same_order():
    m = re.search(r"val FIELDS = listOf\(([^)]*)\)", KOTLIN_BENCHMARK.read_text())
    assert m, "BenchmarkResult.FIELDS not found in Benchmark.kt"
    assert tuple(re.findall(r'"([a-z_]+)"', m.group(1))) == bench.FIELDS
    assert tuple(ROW) == bench.FIELDS


def test_the_chart_is_written_before_the_report(tmp_path, monkeypatch):
    written = []
    real = bench.atomic_write

    def full_after_png(path, data):
        if written:  # the chart went through; the disk is full for the report
            raise DiskFull(f"disk full while writing {path}: no space left on device")
        real(path, data)
        written.append(Path(path).name)

    monkeypatch.setattr(bench, "atomic_write", full_after_png)
    with pytest.raises(DiskFull, match="bench.json"):
        bench.write_outputs([ROW], tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["bench.png"]

    def full(path, data):
        raise DiskFull(f"disk full while writing {path}: no space left on device")

    monkeypatch.setattr(bench, "atomic_write", full)
    with pytest.raises(DiskFull, match="bench.png"):
        bench.write_outputs([ROW], tmp_path / "b")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    monkeypatch.setattr(bench, "atomic_write", real)
    paths = bench.write_outputs([ROW], tmp_path / "c")
    assert json.loads(paths["json"].read_text())["rows"] == [ROW]
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and "ttft_warm_s" in paths["markdown"].read_text()


@pytest.mark.parametrize("args, field", [
    (["run", "B", "--image", "i.png", "--prompt", "q", "--temperature", "1", "--top-p", "0"], "--top-p"),
    (["run", "B", "--image", "i.png", "--prompt", "q", "--temperature", "-1"], "--temperature"),
    (["run", "B", "--image", "i.png", "--prompt", "q", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["run", "B", "--image", "i.png", "--prompt", "q", "--threads", "0"], "--threads"),
    (["run", "B", "--image", "i.png", "--prompt", "q", "--threads", "100000"], "between 1 and 256"),
    (["run", "B", "--image", "i.png", "--prompt", "q", "--prompt", " "], "a prompt is empty"),
    (["bench", "B", "--n-runs", "0"], "--n-runs"),
    (["bench", "B", "--threads", "0"], "--threads"),
    (["bench", "B", "--threads", "100000"], "between 1 and 256"),
    (["bench", "B", "--output-dir", ""], "--output-dir is empty"),  # was: the current folder
    (["eval", "--answers", "a.jsonl", "--bench", "easyvqa", "--output-dir", ""], "--output-dir is empty"),
    (["bench", "B", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["bench", "B", "--accuracy-limit", "-1"], "--accuracy-limit"),
    (["bench", "B", "--device", "phone"], "--device"),
    (["eval", "--answers", ".", "--bench", "easyvqa"], "answer file . is a folder"),  # was: "not found"
    (["eval", "--answers", "/dev/null", "--bench", "easyvqa"], "answer file /dev/null is not a regular file"),
    (["export", "C", "--opt", "onnx.group_size=32", "--opt", "onnx.group_size=64"], "onnx.group_size is given twice"),
    (["train", "--method", "baseline", "student=1"], "student=1: neither a checkpoint directory nor a preset"),
])
def test_bad_options_are_one_error_line(args, field, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from alignkd.cli import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], r.stderr
    assert r.stdout == "" and not (tmp_path / "runs").exists()  # refused before anything is written


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    from alignkd.export.exporter import export_bundle

    out = tmp_path_factory.mktemp("b") / "bundle"
    export_bundle(ckpt, out, ["gguf"], ["fp32"], target="desktop", log=lambda *_: None)
    return out


def test_every_bundle_is_verified_before_the_first_is_measured(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("a bundle was measured"))
    with pytest.raises(DataError, match="nope is not a complete bundle"):
        bench.bench_host([str(bundle), str(tmp_path / "nope")], n_runs=1)


def test_host_worker_reports_every_field_cold_and_warm(bundle):
    row = bench.bench_artifact(str(bundle), "gguf", "fp32", n_runs=1, threads=1, max_new_tokens=3)
    assert tuple(row) == bench.FIELDS  # the warm asks hit the cache (bench_artifact raises otherwise)
    assert row["n_runs"] == 1 and row["ttft_warm_s"] > 0 and row["ttft_s"] >= row["image_encode_s"] > 0


def test_a_failing_artifact_keeps_the_rows_measured_before_it(bundle, tmp_path, monkeypatch):
    import subprocess

    from click.testing import CliRunner

    from alignkd.cli import main

    calls = []

    def worker(args, **_):  # the first artifact measured, the second one's runtime fails
        calls.append(args)
        if len(calls) == 1:
            return subprocess.CompletedProcess(args, 0, json.dumps(ROW) + "\n",
                                               "warning: b failed its parity gate at export\n")
        return subprocess.CompletedProcess(args, 2, "", "some log\nerror: the runtime ran out of memory\n")

    monkeypatch.setattr(bench.subprocess, "run", worker)
    r = CliRunner().invoke(main, ["bench", str(bundle), str(bundle), "--output-dir", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "gguf/fp32 (the runtime ran out of memory) failed" in errors[0], r.stderr
    assert "['" not in errors[0] and "1 measured row(s) are written" in errors[0]
    assert "warning: b failed its parity gate" in r.stderr  # a worker's warning is not swallowed
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["rows"] == [ROW]
    assert (tmp_path / "out" / "bench.png").exists() and len(calls) == 2
