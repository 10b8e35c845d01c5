"""`alignkd-mobile export` bundles: verified by every reader, refusing bad bundles with a category; bad requests
and faults (full disk, killed exports, umask) as one error; emulator; run; bench; adb."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignkd.errors import AlignKDError, CheckpointError, ConfigError, DataError
from alignkd.export.bundle import BundleError, Refusal, read_manifest, sha256_file
from alignkd.export.exporter import ExportFailed, export_bundle

CLI = str(Path(sys.executable).with_name("alignkd-mobile"))
QUIET = dict(log=lambda *_: None)


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
    arts = {a["format"]: a for a in m["artifacts"]}
    assert arts["gguf"]["options"] == {"vision_quant": "fp32"} and arts["onnx"]["options"]["vision_quant"] == "fp32"
    assert all(0 <= v["image_rel"] < 1e-3 and v["image_cos"] > 0.99999 for v in m["parity"].values())


@pytest.mark.parametrize("damage, refusal, message", [
    (lambda b: (b / "template.json").write_text("{}"), Refusal.SIZE_MISMATCH, "size"),
    (lambda b: (b / "preprocessing.json").unlink(), Refusal.MISSING_FILE, "is missing"),
    (lambda b: _edit(b, lambda m: m["files"].append({"path": "../../etc/passwd", "sha256": "0", "size": 1})),
     Refusal.PATH_OUTSIDE, "outside the bundle"),
    (lambda b: _edit(b, lambda m: m["files"].append({"path": "/etc/passwd", "sha256": "0", "size": 1})),
     Refusal.PATH_OUTSIDE, "outside the bundle"),
    (lambda b: _edit(b, lambda m: m.update(format_version=99)), Refusal.UNKNOWN_VERSION, "unknown format_version 99"),
    (lambda b: (b / "manifest.json").unlink(), Refusal.MISSING_MANIFEST, "not a complete bundle"),
    # mistyped fields: one error naming the field, in every reader (issue 17)
    (lambda b: _edit(b, lambda m: m.update(artifacts=["onnx/fp32/decoder.onnx"])), Refusal.INVALID_FIELD,
     "invalid field 'artifacts': malformed entry 'onnx/fp32/decoder.onnx'"),
    (lambda b: _edit(b, lambda m: m.update(artifacts=[{}, {}])), Refusal.INVALID_FIELD, "invalid field 'artifacts'"),
    (lambda b: _edit(b, lambda m: m.update(model={})), Refusal.INVALID_FIELD,
     "invalid field 'model': hidden_size, .*, max_seq_len, eos_ids missing or not integers"),
    (lambda b: _edit(b, lambda m: m["model"].update(max_seq_len="512")), Refusal.INVALID_FIELD,
     "invalid field 'model': max_seq_len missing or not integers"),
    (lambda b: _edit(b, lambda m: m["model"].update(eos_ids=[])), Refusal.INVALID_FIELD, "eos_ids"),
    # "no" is truthy: a failed gate must not read as passed; nor one with no verdict at all
    (lambda b: _edit(b, lambda m: m["artifacts"][0].update(parity_passed="no")), Refusal.INVALID_FIELD,
     "parity_passed of .* must be true or false, not 'no'"),
    (lambda b: _edit(b, lambda m: m["artifacts"][0].pop("parity_passed")), Refusal.INVALID_FIELD,
     "parity_passed of .* must be true or false, not absent"),
    (lambda b: _edit(b, lambda m: m["artifacts"][0].update(options="x")), Refusal.INVALID_FIELD,
     "options of .* must be an object, not 'x'"),
    (lambda b: _edit(b, lambda m: m.update(format_version=True)), Refusal.UNKNOWN_VERSION,
     "unknown format_version True"),  # True == 1 in Python; the app refuses it too
])
def test_bad_bundles_are_refused(bundle, tmp_path, damage, refusal, message):
    from alignkd.export.emulator import BundleRunner

    b = _copy(bundle, tmp_path)
    damage(b)
    with pytest.raises(BundleError, match=message) as e:
        read_manifest(b)
    assert e.value.refusal is refusal
    with pytest.raises(BundleError, match=message):
        BundleRunner(b)


def test_a_mistyped_manifest_is_one_error_line_in_the_cli(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    _edit(b, lambda m: m.update(model={}))
    from alignkd.data.easyvqa import first_test_image

    r = subprocess.run([CLI, "run", str(b), "--image", str(first_test_image()), "--prompt", "?"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {b / 'manifest.json'}: invalid field 'model': hidden_size")


def _edit(b: Path, fn) -> None:
    m = json.loads((b / "manifest.json").read_text())
    fn(m)
    (b / "manifest.json").write_text(json.dumps(m))


def test_every_format_gives_the_eager_greedy_tokens(bundle, ckpt):
    """fp32 bundles through the emulator = the eager model (GGUF: its llama.cpp-semantics reference)."""
    from alignkd.export.base import EagerRuntime, ExportOptions, get_target
    from alignkd.export.emulator import BundleRunner
    from alignkd.export.parity import parity_image
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
    with pytest.raises(ConfigError, match="no export format given"):
        export_bundle(ckpt, tmp_path / "x", [], None, target="desktop", **QUIET)
    with pytest.raises(ConfigError, match="--quant names no quantization"):
        export_bundle(ckpt, tmp_path / "x", ["gguf"], [], target="desktop", **QUIET)
    with pytest.raises(ConfigError, match="--max-seq-len must be positive, got -1"):
        export_bundle(ckpt, tmp_path / "x", ["gguf"], None, target="desktop", max_seq_len=-1, **QUIET)
    with pytest.raises(ConfigError, match="gguf: max_seq_len 1024 must be between 145 .* context of 512"):
        export_bundle(ckpt, tmp_path / "x", ["gguf"], None, target="desktop", max_seq_len=1024, **QUIET)
    # every format is checked before the first export: pte's refusal comes before gguf's export
    with pytest.raises(ConfigError, match=r"vision_quant 'q8_0' is not supported \(supported: auto, fp32, 8da8w, 8da4w\)"):
        export_bundle(ckpt, tmp_path / "x", ["gguf", "pte"], None, target="desktop", options={"vision_quant": "q8_0"}, **QUIET)
    with pytest.raises(ConfigError, match="option 'accuracy_level' belongs to none of the formats exported "
                                          r"\(pte: group_size, embedding_quant, vision_quant; gguf: vision_quant\)"):
        export_bundle(ckpt, tmp_path / "x", ["pte", "gguf"], None, target="desktop", options={"accuracy_level": 0}, **QUIET)
    with pytest.raises(ConfigError, match="option onnx.accuracy_level: format 'onnx' is not exported here"):
        export_bundle(ckpt, tmp_path / "x", ["gguf"], None, target="desktop", options={"onnx.accuracy_level": 0}, **QUIET)
    with pytest.raises(ConfigError, match=r"gguf: unknown option\(s\) group_size \(known: vision_quant\)"):
        export_bundle(ckpt, tmp_path / "x", ["gguf"], None, target="desktop", options={"gguf.group_size": 32}, **QUIET)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_options_go_to_the_formats_that_have_them():
    from alignkd.export.exporter import split_options

    got = split_options(["pte", "onnx", "gguf"], {"group_size": "64", "vision_quant": "fp32", "onnx.accuracy_level": "0"})
    assert got == {"pte": {"group_size": "64", "vision_quant": "fp32"},
                   "onnx": {"group_size": "64", "vision_quant": "fp32", "accuracy_level": "0"},
                   "gguf": {"vision_quant": "fp32"}}


@pytest.mark.parametrize("args, message", [
    (["--format", ","], "error: no export format given (supported: pte, onnx, gguf)"),
    (["--format", "gguf", "--max-seq-len", "-1"], "error: Invalid value for '--max-seq-len': -1 is not in the range x>=1."),
    (["--format", "onnx", "--vision-quant", "8da8w"], "error: onnx: vision_quant '8da8w' is not supported "
                                                      "(supported: auto, fp32, fp16, int8, int4)"),
    (["--format", "onnx", "--opt", "accuracy_level"], "error: Invalid value for '--opt': expected KEY=VALUE"),
    (["--format", "pte", "--opt", "pte.group_size=33"], "error: pte: group_size 33 must divide the embedding width 64"),
])
def test_cli_refuses_bad_export_requests_in_one_line(ckpt, tmp_path, args, message):
    out = tmp_path / "b"
    r = subprocess.run([CLI, "export", str(ckpt), "--target", "desktop", "--output-dir", str(out), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".b.*"))


@pytest.mark.parametrize("out, says", [
    ("{ckpt}", "is or holds the input"),  # --overwrite would delete the checkpoint
    ("{ckpt_parent}", "is or holds the input"),
    ("", "is empty: name a folder"),
    (".", "is the current folder or holds it"),
    ("..", "is the current folder or holds it"),
])
def test_export_never_replaces_its_checkpoint_or_the_current_folder(ckpt, tmp_path, monkeypatch, out, says):
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in ckpt.iterdir())
    out = out.format(ckpt=ckpt, ckpt_parent=ckpt.parent)
    r = subprocess.run([CLI, "export", str(ckpt), "--target", "desktop", "--format", "gguf", "--quant", "fp32",
                        "--output-dir", out, "--overwrite"], capture_output=True, text=True, cwd=work)
    assert r.returncode == 2 and r.stderr.startswith("error: --output-dir") and says in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == before and not list(work.iterdir())


def test_export_push_without_a_device_is_refused_before_the_export(ckpt, tmp_path):
    env, _ = _fake_adb(tmp_path, device=False)
    out = tmp_path / "b"
    r = subprocess.run([CLI, "export", str(ckpt), "--target", "desktop", "--format", "gguf", "--quant", "fp32",
                        "--output-dir", str(out), "--push"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: no Android device ready for adb"), r.stderr
    assert r.stdout == "" and not out.exists()


def test_a_file_field_that_is_no_path_reads_the_default_file_as_the_app_does(bundle, tmp_path):
    """`tokenizer: null`, `preprocessing: [1]`, no `template`: the app's Manifest.fileOf reads the default file
    then; so does the emulator (it used to fail with a TypeError)."""
    from alignkd.export.emulator import BundleRunner

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m.update(tokenizer=None, preprocessing=[1])
    del m["template"]
    (b / "manifest.json").write_text(json.dumps(m))
    edited, plain = BundleRunner(b, "gguf", "fp32", threads=1), BundleRunner(bundle, "gguf", "fp32", threads=1)
    try:
        assert edited.preprocessing == plain.preprocessing and edited.template == plain.template
        assert edited.prompt_ids("What shape?") == plain.prompt_ids("What shape?")
    finally:
        edited.close()
        plain.close()


def _resign(b: Path) -> None:
    """Rewrite the manifest's sizes and checksums: a damaged file that passes verification (edited by hand, or
    written by another tool)."""
    _edit(b, lambda m: m.update(files=[{**f, "size": (b / f["path"]).stat().st_size,
                                        "sha256": sha256_file(b / f["path"])} for f in m["files"]]))


def _artifact_damage(fmt: str, data: bytes):
    """The artifact's main file replaced by `data`, or cut to 1000 bytes."""
    main = {"onnx": "onnx/fp32/decoder.onnx", "gguf": "gguf/fp32/model-f32.gguf"}[fmt]
    return lambda b: (b / main).write_bytes(data if data else (b / main).read_bytes()[:1000])


@pytest.mark.parametrize("fmt, damage, says", [
    ("gguf", lambda b: (b / "template.json").write_text("[1, 2]"), r"template file template.json: prompt_format"),
    ("gguf", lambda b: (b / "template.json").write_text('{"prompt_format": 3}'), r"template file .*prompt_format"),
    ("gguf", lambda b: (b / "template.json").write_bytes(b"\xff\xfe"), r"template file template.json: UnicodeDecodeError"),
    ("gguf", lambda b: (b / "preprocessing.json").write_text(""), r"preprocessing file .*JSONDecodeError"),
    ("gguf", lambda b: _edit_json(b / "preprocessing.json", lambda d: d.update(image_std=[float("nan"), 1, 1])),
     r"preprocessing file .*image_std must be 3 finite numbers"),
    ("gguf", lambda b: _edit_json(b / "preprocessing.json", lambda d: d.update(pad_to_square="no")),
     r"preprocessing file .*pad_to_square must be true or false"),
    ("gguf", lambda b: (b / "tokenizer/tokenizer.model").write_bytes(b"garbage"), r"tokenizer file tokenizer/tokenizer"),
    ("gguf", _artifact_damage("gguf", b""), r"gguf/fp32 artifact"),
    ("onnx", _artifact_damage("onnx", b""), r"onnx/fp32 artifact"),
    ("onnx", lambda b: (b / "onnx/fp32/onnx_model.json").write_text("[]"), r"onnx/fp32 artifact"),
    ("onnx", lambda b: _swap(b / "onnx/fp32/vision.onnx", b / "onnx/fp32/decoder.onnx"),
     r"onnx/fp32 artifact: .*vision.onnx is not the vision graph \(its inputs: inputs_embeds"),
    ("gguf", lambda b: _edit(b, lambda m: m["model"].update(eos_ids=[10**30])),
     r"model.eos_ids \[10{30}\] is outside the vocabulary \(token ids 0 to 511\)"),
    ("gguf", lambda b: _edit(b, lambda m: m["model"].update(bos_id=100000)), r"model.bos_id 100000 is outside"),
    ("gguf", lambda b: _edit(b, lambda m: m["model"].update(pad_id=-7)), r"model.pad_id -7 is outside"),
    ("gguf", lambda b: _edit(b, lambda m: m.update(template="manifest.json")), r"template file manifest.json"),
    ("gguf", lambda b: _edit(b, lambda m: m.update(preprocessing="nope.json")),
     r"preprocessing file nope.json: FileNotFoundError"),
])
def test_a_damaged_file_that_passes_its_checksum_is_one_error_naming_it(bundle, tmp_path, fmt, damage, says):
    """What a bad-input campaign found crashing `run` (JSON, PIL, tokenizer, runtime errors) once a damaged file's
    checksum was rewritten, or a manifest edited to name the wrong file."""
    from alignkd.export.emulator import BundleRunner

    b = _copy(bundle, tmp_path)
    damage(b)
    _resign(b)
    with pytest.raises(AlignKDError, match=f"bundle {re.escape(str(b))}: .*{says}"):
        BundleRunner(b, fmt, "fp32", threads=1)


def test_a_manifest_whose_image_token_count_is_not_its_encoders_is_refused(bundle, tmp_path):
    """The budget check (`check_fits`, and the app's) counts the manifest's number: 10 instead of 144 passed."""
    from alignkd.data.easyvqa import first_test_image
    from alignkd.export.emulator import BundleRunner

    b = _copy(bundle, tmp_path)
    _edit(b, lambda m: m["model"].update(num_image_tokens=10))
    runner = BundleRunner(b, "gguf", "fp32", threads=1)
    with pytest.raises(DataError, match=r"model.num_image_tokens is 10, but its image encoder makes 144"):
        runner.answer(first_test_image(), "What shape?", max_new_tokens=2)


def test_a_file_that_is_no_executorch_program_is_refused_before_the_runtime_reads_it(tmp_path):
    """ExecuTorch aborts the process (C++ terminate, exit 134) on some such files: no Python error to catch."""
    from alignkd.export.executorch import PteRuntime

    (tmp_path / "model.pte").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match=r"model.pte is not an ExecuTorch program \(no ET12 flatbuffer header\)"):
        PteRuntime(tmp_path / "model.pte")


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_export_help_lists_every_option_of_every_target():
    from alignkd.export.base import TARGETS, get_target, option_names

    r = subprocess.run([CLI, "export", "--help"], capture_output=True, text=True)
    text = " ".join(r.stdout.split())
    for fmt in TARGETS:
        assert f"{fmt}:" in text
        for name in option_names(get_target(fmt)):
            assert name in text, (fmt, name)


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
    assert capsys.readouterr().err == "error: disk full while writing /out/model.pte: no space left on device\n"


@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only, as CI runs): a real full disk."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_during_a_gguf_export_is_one_error_naming_the_file(ckpt, small_disk):
    """The tiny student's F32 GGUF pair (1.5 MB) does not fit in 1 MiB: gguf-py's short write becomes one
    line naming the file, and the disk holds no bundle and no temp folder afterwards."""
    out = small_disk / "b"
    r = subprocess.run([CLI, "export", str(ckpt), "--target", "desktop", "--format", "gguf", "--quant", "fp32",
                        "--output-dir", str(out)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: disk full while writing {small_disk}/.b.tmp-") and ".gguf" in r.stderr
    assert list(small_disk.iterdir()) == []


def test_stale_temp_folders_of_a_killed_export_are_removed_at_the_next(ckpt, tmp_path):
    """A kill -9 leaves `.<bundle>.tmp-<pid>-*`; the next export to the same place removes it (not a live one's)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".b.tmp-{dead.pid}-xyz"
    (stale / "gguf").mkdir(parents=True)
    (stale / "gguf" / "model-f32.gguf").write_bytes(b"half written")
    live = tmp_path / f".b.tmp-{os.getpid()}-abc"
    live.mkdir()
    export_bundle(ckpt, tmp_path / "b", ["gguf"], ["fp32"], target="desktop", **QUIET)
    assert not stale.exists() and live.exists() and (tmp_path / "b" / "manifest.json").is_file()


@pytest.mark.slow
def test_kill_during_an_overwrite_export_keeps_the_old_bundle(ckpt, tmp_path):
    """kill -9 while `export --overwrite` writes its new artifacts: the old bundle still verifies, whole."""
    import signal
    import time

    export_bundle(ckpt, tmp_path / "b", ["gguf"], ["fp32"], target="desktop", **QUIET)
    before = read_manifest(tmp_path / "b")
    p = subprocess.Popen([CLI, "export", str(ckpt), "--target", "desktop", "--format", "onnx,gguf", "--quant", "fp32",
                          "--output-dir", str(tmp_path / "b"), "--overwrite"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(tmp_path.glob(".b.tmp-*/onnx/fp32/*")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the new bundle's first artifact is being written
    assert p.poll() is None, "the export ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert read_manifest(tmp_path / "b") == before  # verified again: sizes and checksums of every file


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_bundle_honours_the_umask(ckpt, tmp_path, umask):
    code = (f"import os; os.umask({umask}); from alignkd.export.exporter import export_bundle; "
            f"export_bundle({str(ckpt)!r}, {str(tmp_path / 'b')!r}, ['gguf'], ['fp32'], target='desktop', log=print)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    paths = [tmp_path / "b", *(tmp_path / "b").rglob("*")]
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in paths}
    want_dir, want_file = 0o777 & ~umask, 0o666 & ~umask
    assert all(m == (want_dir if (tmp_path / p).is_dir() else want_file) for p, m in modes.items()), modes


def test_failed_parity_fails_the_export_and_marks_nothing_complete(ckpt, tmp_path, monkeypatch):
    import alignkd.export.gguf.target as gx
    from alignkd.export.parity import Thresholds

    monkeypatch.setitem(gx.THRESHOLDS, "fp32", Thresholds(logits_rel=0.0, image_cos=1.1))
    with pytest.raises(ExportFailed, match="parity gate failed for gguf/fp32"):
        export_bundle(ckpt, tmp_path / "b", ["gguf"], ["fp32"], target="desktop", **QUIET)
    assert not (tmp_path / "b").exists()
    failed = tmp_path / "b.failed"
    assert (failed / "parity_report.json").is_file() and not (failed / "manifest.json").exists()
    with pytest.raises(DataError, match="not a complete bundle"):
        read_manifest(failed)


def test_allow_failed_parity_writes_a_complete_bundle_that_says_so(ckpt, tmp_path, monkeypatch):
    """--allow-failed-parity (speed runs on random weights): a verified bundle whose manifest records the
    failure, and a runner that knows it."""
    import alignkd.export.gguf.target as gx
    from alignkd.export.emulator import BundleRunner
    from alignkd.export.parity import Thresholds

    monkeypatch.setitem(gx.THRESHOLDS, "fp32", Thresholds(logits_rel=0.0, image_cos=1.1))
    export_bundle(ckpt, tmp_path / "b", ["gguf"], ["fp32"], target="desktop", allow_failed_parity=True, **QUIET)
    m = read_manifest(tmp_path / "b")
    assert m["parity"]["gguf/fp32"]["passed"] is False and m["artifacts"][0]["parity_passed"] is False
    assert not (tmp_path / "b.failed").exists()
    runner = BundleRunner(tmp_path / "b")
    assert runner.parity_passed is False
    runner.close()


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
           "ttft_s": 0.6, "ttft_warm_s": 0.1, "prefill_tok_s": 400.0, "decode_tok_s": 30.0, "peak_rss_mb": 900.0}
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


def test_a_bundle_failing_on_the_phone_keeps_the_rows_measured_before_it(bundle, tmp_path):
    row = {"bundle": "bundle", "format": "pte", "quant": "8da4w", "n_runs": 3, "load_s": 0.5, "image_encode_s": 0.2,
           "ttft_s": 0.6, "ttft_warm_s": 0.1, "prefill_tok_s": 400.0, "decode_tok_s": 30.0, "peak_rss_mb": 900.0}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "adb").write_text(f"""#!/bin/sh
case "$*" in
  *get-state*) echo device ;;
  *"cat files/bench-other.json"*) echo '{{"error": "the app ran out of memory"}}' ;;
  *"exec-out run-as"*) echo '{json.dumps(row)}' ;;
esac
exit 0
""")
    (bin_dir / "adb").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = tmp_path / "benchout"
    r = subprocess.run([CLI, "bench", str(bundle), str(tmp_path / "other"), "--device", "adb", "--output-dir", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "other (the app's benchmark of /data/local/tmp/alignkd/other failed: the app ran out " \
        "of memory) failed; the 1 measured row(s) are written" in errors[0], r.stderr
    assert json.loads((out / "bench.json").read_text())["rows"] == [{**row, "device": "adb:default"}]


def test_push_without_adb_is_one_clear_error(bundle, tmp_path):
    from alignkd.export.exporter import push_bundle

    env_path = os.environ["PATH"]
    os.environ["PATH"] = str(tmp_path)
    try:
        with pytest.raises(DataError, match="needs adb on PATH"):
            push_bundle(bundle)
    finally:
        os.environ["PATH"] = env_path


def test_run_short_answer_asks_as_eval_and_the_demo_do(bundle):
    """`run --short-answer` sends the question eval sends (and the easy-vqa demo trains on)."""
    from alignkd.data.easyvqa import first_test_image
    from alignkd.data.templates import SHORT_ANSWER_PROMPT

    def prefill(*prompt: str) -> tuple[str, str]:
        r = subprocess.run([CLI, "run", str(bundle), "--image", str(first_test_image()), "--format", "gguf",
                            "--max-new-tokens", "3", *prompt], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout, re.search(r"prefill (\d+) positions", r.stderr).group(1)

    typed = prefill("--prompt", f"What shape?\n{SHORT_ANSWER_PROMPT}")
    assert prefill("--prompt", "What shape?", "--short-answer") == typed != prefill("--prompt", "What shape?")


def test_run_and_host_bench_commands(bundle, tmp_path):
    from alignkd.export.parity import parity_image

    img = tmp_path / "img.png"
    parity_image().save(img)
    r = subprocess.run([CLI, "run", str(bundle), "--image", str(img), "--prompt", "What shape?", "--format", "onnx",
                        "--prompt", "What shape?", "--max-new-tokens", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first, again = [line for line in r.stderr.splitlines() if line.startswith("[bundle:onnx/fp32]")]
    assert "image cached" not in first and "image cached" in again  # the follow-up skips the encoder
    answers = r.stdout.splitlines()
    assert len(answers) == 2 and answers[0] == answers[1]
    out = tmp_path / "bench"
    r = subprocess.run([CLI, "bench", str(bundle), "--n-runs", "1", "--accuracy-limit", "2", "--max-new-tokens", "4",
                        "--threads", "1", "--output-dir", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert {(x["format"], x["quant"]) for x in rows} == {("onnx", "fp32"), ("gguf", "fp32")}
    assert all(x["decode_tok_s"] > 0 and x["peak_rss_mb"] > 0 and x["easyvqa_n"] == 2 for x in rows)
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # two quantized exports and their gates: about a minute
def test_export_and_run_print_only_their_own_lines(ckpt, tmp_path):
    """ExecuTorch's and torch.onnx's logs (CPU probing on every runtime load, a kernel note per eager call,
    deprecation warnings from inside torch.export: ~130 lines per export) reached the user's terminal."""
    from alignkd.data.easyvqa import first_test_image

    out = tmp_path / "b"
    r = subprocess.run([CLI, "export", str(ckpt), "--target", "desktop", "--format", "pte,onnx", "--output-dir",
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    assert "parity passed for pte/8da4w, onnx/int4" in r.stdout, r.stdout
    for fmt in ("pte", "onnx"):
        r = subprocess.run([CLI, "run", str(out), "--format", fmt, "--image", str(first_test_image()), "--prompt",
                            "What shape?", "--max-new-tokens", "2"], capture_output=True, text=True)
        assert r.returncode == 0 and re.fullmatch(r"\[b:\w+/\w+\] load .*\n", r.stderr), r.stderr[-3000:]
