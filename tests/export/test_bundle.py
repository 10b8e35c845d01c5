"""`alignkd-mobile export` bundles: verified by every reader, refusing bad bundles; emulator; run; bench; adb."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignkd.errors import CheckpointError, ConfigError, DataError
from alignkd.export.bundle import read_manifest
from alignkd.export.exporter import ExportFailed, export_bundle
from alignkd.model import build_model, save_model
from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir

CLI = str(Path(sys.executable).with_name("alignkd-mobile"))
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ck") / "student"
    save_model(build_model("tiny-student", seed=0), d, tokenizer=load_tokenizer(tiny_tokenizer_dir()))
    return d


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    export_bundle(ckpt, out, ["onnx", "gguf"], ["fp32"], target="desktop", **QUIET)
    return out


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_bundle_is_complete_and_verified(bundle):
    m = read_manifest(bundle)
    assert m["format_version"] == 1 and {(a["format"], a["quant"]) for a in m["artifacts"]} == {("onnx", "fp32"), ("gguf", "fp32")}
    assert all(v["passed"] for v in m["parity"].values())
    paths = {f["path"] for f in m["files"]}
    assert {"preprocessing.json", "template.json", "tokenizer/tokenizer.model", "tokenizer/vocab.json",
            "parity_report.json"} <= paths
    report = json.loads((bundle / "parity_report.json").read_text())
    assert "faithful_divergence" in report["artifacts"]["gguf/fp32"]


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "template.json").write_text("{}"), "size|checksum"),
    (lambda b: (b / "preprocessing.json").unlink(), "is missing"),
    (lambda b: _edit(b, lambda m: m["files"].append({"path": "../../etc/passwd", "sha256": "0", "size": 1})), "outside the bundle"),
    (lambda b: _edit(b, lambda m: m["files"].append({"path": "/etc/passwd", "sha256": "0", "size": 1})), "outside the bundle"),
    (lambda b: _edit(b, lambda m: m.update(format_version=99)), "unknown format_version 99"),
    (lambda b: (b / "manifest.json").unlink(), "not a complete bundle"),
])
def test_bad_bundles_are_refused(bundle, tmp_path, damage, message):
    from alignkd.export.emulator import BundleRunner

    b = _copy(bundle, tmp_path)
    damage(b)
    with pytest.raises(DataError, match=message):
        read_manifest(b)
    with pytest.raises(DataError, match=message):
        BundleRunner(b)


def _edit(b: Path, fn) -> None:
    m = json.loads((b / "manifest.json").read_text())
    fn(m)
    (b / "manifest.json").write_text(json.dumps(m))


def test_every_format_gives_the_eager_greedy_tokens(bundle, ckpt):
    """fp32 bundles through the emulator = the eager model (GGUF: its llama.cpp-semantics reference)."""
    from alignkd.export.base import EagerRuntime, ExportOptions
    from alignkd.export.emulator import BundleRunner
    from alignkd.export.exporter import get_target, parity_image
    from alignkd.export.runtime import generate
    from alignkd.model import load_model

    model = load_model(ckpt)
    for fmt in ("onnx", "gguf"):
        runner = BundleRunner(bundle, fmt, "fp32", threads=1)
        ans = runner.answer(parity_image(), "What color is the shape?", max_new_tokens=8)
        ids = runner.prompt_ids("What color is the shape?")
        ref_rt = get_target(fmt).reference(model, ExportOptions()) if fmt == "gguf" else EagerRuntime(model)
        ref = generate(ref_rt, ids, runner.pixels(parity_image()), 8, runner.eos_ids[0])
        assert ans.tokens == ref.tokens, fmt


def test_prompt_longer_than_max_seq_len_is_refused_before_compute(bundle):
    from alignkd.export.emulator import BundleRunner

    runner = BundleRunner(bundle, "onnx")
    with pytest.raises(DataError, match="exceeds max_seq_len 512"):
        runner.answer("/nonexistent.png", "word " * 400, max_new_tokens=4)  # refused before the image is read


def test_export_refuses_bad_requests(ckpt, bundle, tmp_path):
    with pytest.raises(DataError, match="exists; pass --overwrite"):
        export_bundle(ckpt, bundle, ["onnx"], ["fp32"], target="desktop", **QUIET)
    with pytest.raises(ConfigError, match="q9_9 is not supported.*gguf: fp32, fp16, q8_0, q4_0, q4_k_m"):
        export_bundle(ckpt, tmp_path / "x", ["gguf"], ["q9_9"], target="desktop", **QUIET)
    with pytest.raises(ConfigError, match="needs the ExecuTorch format"):
        export_bundle(ckpt, tmp_path / "x", ["onnx"], None, target="android", **QUIET)
    with pytest.raises(CheckpointError, match="does not exist"):
        export_bundle(tmp_path / "nope", tmp_path / "x", ["onnx"], ["fp32"], target="desktop", **QUIET)
    assert not (tmp_path / "x").exists()


def test_disk_full_mid_export_leaves_no_bundle(ckpt, tmp_path, monkeypatch):
    import alignkd.export.onnx_export as ox

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "decoder.onnx")

    monkeypatch.setattr(ox.OnnxTarget, "export", full)
    with pytest.raises(OSError):
        export_bundle(ckpt, tmp_path / "b", ["onnx"], ["fp32"], target="desktop", **QUIET)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp-*"))


def test_cli_turns_a_full_disk_into_one_line(capsys):
    from alignkd.cli import _clean_errors

    @_clean_errors
    def writes():
        raise OSError(errno.ENOSPC, "No space left on device", "/out/model.pte")

    with pytest.raises(SystemExit) as e:
        writes()
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: disk full while writing /out/model.pte: No space left on device\n"


def test_failed_parity_fails_the_export_and_marks_nothing_complete(ckpt, tmp_path, monkeypatch):
    import alignkd.export.gguf_export as gx
    from alignkd.export.parity import Thresholds

    monkeypatch.setitem(gx.THRESHOLDS, "fp32", Thresholds(logits_rel=0.0, image_cos=1.1))
    with pytest.raises(ExportFailed, match="parity gate failed for gguf/fp32"):
        export_bundle(ckpt, tmp_path / "b", ["gguf"], ["fp32"], target="desktop", **QUIET)
    assert not (tmp_path / "b").exists()
    failed = tmp_path / "b.failed"
    assert (failed / "parity_report.json").is_file() and not (failed / "manifest.json").exists()
    with pytest.raises(DataError, match="not a complete bundle"):
        read_manifest(failed)


def _fake_adb(tmp_path: Path, device: bool, bench_json: dict | None = None) -> dict:
    """A fake `adb` on PATH that logs its calls and answers like a phone (or like no phone)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "adb.log"
    payload = json.dumps(bench_json or {})
    script = f"""#!/bin/sh
echo "$@" >> {log}
case "$*" in
  *get-state*) {'echo device' if device else 'echo "error: no devices/emulators found" >&2; exit 1'} ;;
  *"exec-out run-as"*) echo '{payload}' ;;
esac
exit 0
"""
    (bin_dir / "adb").write_text(script)
    (bin_dir / "adb").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def test_push_and_adb_bench_with_a_fake_adb(bundle, tmp_path):
    env, log = _fake_adb(tmp_path, device=False)
    r = subprocess.run([CLI, "bench", str(bundle), "--device", "adb"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "no Android device ready for adb" in r.stderr
    row = {"bundle": "bundle", "format": "pte", "quant": "8da4w", "n_runs": 3, "load_s": 0.5, "image_encode_s": 0.2,
           "ttft_s": 0.6, "prefill_tok_s": 400.0, "decode_tok_s": 30.0, "peak_rss_mb": 900.0}
    (tmp_path / "2").mkdir()
    env, log = _fake_adb(tmp_path / "2", device=True, bench_json=row)
    out = tmp_path / "benchout"
    r = subprocess.run([CLI, "bench", str(bundle), "--device", "adb:ZX1", "--output-dir", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert rows[0]["decode_tok_s"] == 30.0 and rows[0]["device"] == "adb:ZX1"
    calls = log.read_text()
    assert "-s ZX1 shell am start -W -n org.alignkd.demo/.BenchmarkActivity --es bundle /data/local/tmp/alignkd/bundle" in calls


def test_push_without_adb_is_one_clear_error(bundle, tmp_path):
    from alignkd.export.exporter import push_bundle

    env_path = os.environ["PATH"]
    os.environ["PATH"] = str(tmp_path)
    try:
        with pytest.raises(DataError, match="needs adb on PATH"):
            push_bundle(bundle)
    finally:
        os.environ["PATH"] = env_path


def test_run_and_host_bench_commands(bundle, tmp_path):
    from alignkd.export.exporter import parity_image

    img = tmp_path / "img.png"
    parity_image().save(img)
    r = subprocess.run([CLI, "run", str(bundle), "--image", str(img), "--prompt", "What shape?", "--format", "onnx",
                        "--max-new-tokens", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "[bundle:onnx/fp32]" in r.stderr
    out = tmp_path / "bench"
    r = subprocess.run([CLI, "bench", str(bundle), "--n-runs", "1", "--accuracy-limit", "2", "--max-new-tokens", "4",
                        "--threads", "1", "--output-dir", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert {(x["format"], x["quant"]) for x in rows} == {("onnx", "fp32"), ("gguf", "fp32")}
    assert all(x["decode_tok_s"] > 0 and x["peak_rss_mb"] > 0 and x["easyvqa_n"] == 2 for x in rows)
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
