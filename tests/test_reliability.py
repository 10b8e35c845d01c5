"""The README's promise under bad input and faults, tried as a user does: the CLI in a subprocess.

Each case states what a user does wrong, and asserts the exit status (2), exactly one `error:` line on
stderr that names the file or field at fault, no traceback, and what the output folder holds afterwards.
Full-disk cases run on a small tmpfs (root only, as CI runs); kill -9 cases send the signal at a point
the test controls. The README's reliability table is this file's CASES.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

CLI = str(Path(sys.executable).with_name("alignkd-mobile"))
pytestmark = pytest.mark.slow  # every case starts the CLI (and most load a model): minutes in all


def cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=full_env)


def assert_one_error(r: subprocess.CompletedProcess, names: str, code: int = 2) -> str:
    """Exit `code`, no traceback, exactly one `error:` line, and it matches `names` (the file or field)."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert len(errors) == 1, r.stderr[-3000:]
    assert re.search(names, errors[0]), errors[0]
    assert len(errors[0]) < 600, errors[0]
    assert not re.search(r"<class '|<_io\.", errors[0]), errors[0]
    return errors[0]


def listing(root: Path) -> list[str]:
    """Every path under root (hidden temp entries included), to compare a folder before and after."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    r = cli("export", ckpt, "--target", "desktop", "--format", "onnx", "--quant", "fp32", "--output-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from alignkd.data import easyvqa

    out = tmp_path_factory.mktemp("img") / "shape.png"
    shutil.copyfile(easyvqa.first_test_image(), out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A LLaVA-format JSON with two easy-vqa samples and their images beside it."""
    from alignkd.data import easyvqa

    root = tmp_path_factory.mktemp("data")
    samples = []
    for i, q in enumerate(easyvqa.questions("train", limit=2, seed=0)):
        shutil.copyfile(q.image, root / f"{i}.png")
        samples.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{q.question}"}, {"from": "gpt", "value": q.answer}]})
    (root / "train.json").write_text(json.dumps(samples))
    return root / "train.json"


def _copy(src: Path, tmp: Path, name: str) -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    id: str
    what: str  # what the user does wrong (the README table's first column)
    argv: Callable[..., list]  # (tmp, fixtures) -> CLI arguments
    names: str  # regex: the error line names this file or field
    fixtures: tuple[str, ...] = ()


def _manifest(edit: Callable[[dict], None]):
    def argv(tmp, bundle, image):
        b = _copy(bundle, tmp, "b")
        _edit_json(b / "manifest.json", edit)
        return ["run", b, "--image", image, "--prompt", "What shape?"]
    return argv


def _data_with(data: Path, tmp: Path, edit: Callable[[list], None]) -> Path:
    """A copy of the data folder whose JSON went through `edit`."""
    d = _copy(data.parent, tmp, "data")
    samples = json.loads((d / data.name).read_text())
    edit(samples)
    (d / data.name).write_text(json.dumps(samples))
    return d / data.name


def _train(*args) -> list:
    return ["train", "--method", "baseline", "--student", "tiny-student", "steps=2", "batch_size=2", "progress=false",
            *args]


CASES = [
    # ---- train (refused before any weights load: the output folder is never created)
    Case("train-data-dir", "`train --data` pointing at a folder",
         lambda tmp: _train("--data", tmp, "--output-dir", tmp / "o"),
         r"data file .*/work is a directory, not a LLaVA-format JSON file"),
    Case("train-data-not-utf8", "`train --data` pointing at a non-UTF-8 file",
         lambda tmp: _train("--data", _bytes(tmp / "d.json", b"\xff\xfe[]"), "--output-dir", tmp / "o"), r"d\.json"),
    Case("train-data-missing", "`train --data` of a file that does not exist",
         lambda tmp: _train("--data", tmp / "none.json", "--output-dir", tmp / "o"), r"none\.json"),
    Case("train-data-corrupt-json", "`train --data` of a file that is not JSON",
         lambda tmp: _train("--data", _bytes(tmp / "d.json", b"[{"), "--output-dir", tmp / "o"), r"d\.json.*JSON"),
    Case("train-config-not-utf8", "`train --config` of a non-UTF-8 file",
         lambda tmp: ["train", "--config", _bytes(tmp / "c.yaml", b"method: \xff")], r"c\.yaml"),
    Case("train-config-bad-yaml", "`train --config` of an invalid YAML file (one line, not seven)",
         lambda tmp: ["train", "--config", _bytes(tmp / "c.yaml", b"loss:\n  temperature: [2\n")], r"c\.yaml.*YAML"),
    Case("train-unknown-key", "`train` with a key that does not exist (`loss.temprature=2`)",
         lambda tmp: _train("loss.temprature=2", "--output-dir", tmp / "o"), r"loss\.temprature"),
    Case("train-negative-lr", "`train lr=-1`", lambda tmp: _train("lr=-1", "--output-dir", tmp / "o"), r"\blr\b"),
    Case("train-teacher-dtype", "`train teacher_dtype=banana` with a teacher (before the teacher loads)",
         lambda tmp, ckpt: ["train", "--method", "logit-kd", "--teacher", ckpt, "--student", "tiny-student",
                            "teacher_dtype=banana", "--output-dir", tmp / "o"], r"teacher_dtype", ("ckpt",)),
    Case("train-image-number", "a data entry whose `image` is a number",
         lambda tmp, data: _train("--data", _data_with(data, tmp, lambda d: d[1].update(image=3)),
                                  "--output-dir", tmp / "o"), r"train\.json: sample 1: 'image' .*got a number", ("data",)),
    Case("train-image-list", "a data entry whose `image` is a list",
         lambda tmp, data: _train("--data", _data_with(data, tmp, lambda d: d[0].update(image=["0.png"])),
                                  "--output-dir", tmp / "o"), r"train\.json: sample 0: 'image' .*got a list", ("data",)),
    Case("train-image-missing", "a data entry whose image file does not exist",
         lambda tmp, data: _train("--data", _data_with(data, tmp, lambda d: d[0].update(image="gone.png")),
                                  "--output-dir", tmp / "o"), r"gone\.png", ("data",)),
    Case("train-image-corrupt", "a data entry whose image is truncated (found when the dataset is built)",
         lambda tmp, data: _train("--data", _corrupt_image(data, tmp), "--output-dir", tmp / "o"), r"1\.png", ("data",)),
    Case("train-all-too-long", "every sample longer than `data.max_length`",
         lambda tmp, data: _train("--data", data, "data.max_length=20", "--output-dir", tmp / "o"),
         r"over max_length 20",
         ("data",)),
    Case("train-tokenizer-mismatch", "a student checkpoint whose tokenizer does not match its config",
         lambda tmp, ckpt: _train("--student", _bad_eos(ckpt, tmp), "--output-dir", tmp / "o"),
         r"tokenizer does not match", ("ckpt",)),
    Case("train-truncated-weights", "a student checkpoint whose safetensors file is cut short",
         lambda tmp, ckpt: _train("--student", _truncated_weights(ckpt, tmp), "--output-dir", tmp / "o"),
         r"model\.safetensors", ("ckpt",)),
    # ---- info / eval
    Case("info-missing-ckpt", "`info` of a checkpoint folder that does not exist",
         lambda tmp: ["info", tmp / "nope"], r"nope does not exist"),
    Case("eval-no-data-root", "`eval --bench gqa` without `--data-root`",
         lambda tmp, ckpt: ["eval", ckpt, "--bench", "gqa"], r"--data-root", ("ckpt",)),
    Case("eval-batch-0", "`eval --batch-size 0`",
         lambda tmp, ckpt: ["eval", ckpt, "--batch-size", "0"], r"--batch-size", ("ckpt",)),
    Case("eval-limit-0", "`eval --limit 0`", lambda tmp, ckpt: ["eval", ckpt, "--limit", "0"], r"--limit", ("ckpt",)),
    Case("eval-distilled-unknown", "`eval --distilled NAME` that is none of the checkpoints (checked before any model loads)",
         lambda tmp, ckpt: ["eval", ckpt, "--distilled", "x", "--baseline", "student"], r"--distilled 'x'", ("ckpt",)),
    Case("eval-tokenizer-mismatch", "`eval` of a checkpoint whose tokenizer does not match its config",
         lambda tmp, ckpt: ["eval", _bad_eos(ckpt, tmp), "--limit", "2"], r"tokenizer does not match .*EOS", ("ckpt",)),
    Case("eval-no-layout", "`eval --bench pope` on a folder in neither the release's nor LLaVA's layout",
         lambda tmp, ckpt: ["eval", ckpt, "--bench", "pope", "--data-root", tmp], r"pope.*coco_pope", ("ckpt",)),
    Case("eval-missing-answers", "`eval --answers FILE` that does not exist",
         lambda tmp: ["eval", "--answers", tmp / "a.jsonl", "--bench", "easyvqa"], r"a\.jsonl"),
    # ---- export (refused before any artifact is written)
    Case("export-empty-format", "`export --format ,` (no format at all)",
         lambda tmp, ckpt: ["export", ckpt, "--target", "desktop", "--format", ",", "--output-dir", tmp / "o"],
         r"no export format given", ("ckpt",)),
    Case("export-negative-seq", "`export --format gguf --max-seq-len -1`",
         lambda tmp, ckpt: ["export", ckpt, "--target", "desktop", "--format", "gguf", "--max-seq-len", "-1",
                            "--output-dir", tmp / "o"], r"max.seq.len", ("ckpt",)),
    Case("export-gguf-beyond-context", "`export --format gguf --max-seq-len` beyond the model's context",
         lambda tmp, ckpt: ["export", ckpt, "--target", "desktop", "--format", "gguf", "--max-seq-len", "100000",
                            "--output-dir", tmp / "o"], r"max.seq.len", ("ckpt",)),
    Case("export-unknown-quant", "`export --quant int3`",
         lambda tmp, ckpt: ["export", ckpt, "--quant", "int3", "--output-dir", tmp / "o"], r"int3.*supported", ("ckpt",)),
    Case("export-into-checkpoint", "`export CKPT --output-dir CKPT --overwrite` (would replace the checkpoint)",
         lambda tmp, ckpt: ["export", _copy(ckpt, tmp, "ck"), "--output-dir", tmp / "ck", "--overwrite"],
         r"--output-dir .*ck is or holds the input", ("ckpt",)),
    Case("export-exists", "`export` into an existing folder without `--overwrite`",
         lambda tmp, ckpt: ["export", ckpt, "--output-dir", _mkdir(tmp / "o")], r"o exists.*--overwrite", ("ckpt",)),
    # ---- run / bench
    Case("run-top-p-0", "`run --temperature 1 --top-p 0`",
         lambda tmp, bundle, image: ["run", bundle, "--image", image, "--prompt", "q", "--temperature", "1", "--top-p", "0"],
         r"top.p", ("bundle", "image")),
    Case("run-negative-tokens", "`run --max-new-tokens -5`",
         lambda tmp, bundle, image: ["run", bundle, "--image", image, "--prompt", "q", "--max-new-tokens", "-5"],
         r"max.new.tokens", ("bundle", "image")),
    Case("run-threads-huge", "`run --threads 100000` (hung in llama.cpp's thread pool)",
         lambda tmp, bundle, image: ["run", bundle, "--image", image, "--prompt", "q", "--threads", "100000"],
         r"threads.*between 1 and 256", ("bundle", "image")),
    Case("run-threads-0", "`run --threads 0`",
         lambda tmp, bundle, image: ["run", bundle, "--image", image, "--prompt", "q", "--threads", "0"],
         r"threads", ("bundle", "image")),
    Case("run-missing-image", "`run --image` of a file that does not exist",
         lambda tmp, bundle: ["run", bundle, "--image", tmp / "no.png", "--prompt", "q"], r"no\.png", ("bundle",)),
    Case("run-corrupt-image", "`run --image` of a truncated PNG",
         lambda tmp, bundle, image: ["run", bundle, "--image", _truncated(image, tmp), "--prompt", "q"],
         r"cut\.png", ("bundle", "image")),
    Case("bench-n-runs-0", "`bench --n-runs 0`",
         lambda tmp, bundle: ["bench", bundle, "--n-runs", "0", "--output-dir", tmp / "o"], r"n.runs", ("bundle",)),
    Case("bundle-checksum", "a bundle file changed after export (checksum)",
         lambda tmp, bundle, image: ["run", _tampered(bundle, tmp), "--image", image, "--prompt", "q"],
         r"sha256|checksum", ("bundle", "image")),
    Case("bundle-artifacts-strings", "manifest `artifacts` is a list of strings", _manifest(
        lambda m: m.update(artifacts=["onnx/fp32"])), r"artifacts", ("bundle", "image")),
    Case("bundle-artifacts-empty", "manifest `artifacts` is a list of empty objects", _manifest(
        lambda m: m.update(artifacts=[{}])), r"artifacts", ("bundle", "image")),
    Case("bundle-model-empty", "manifest `model` is an empty object", _manifest(
        lambda m: m.update(model={})), r"manifest\.json: invalid field 'model': hidden_size", ("bundle", "image")),
    Case("bundle-seq-string", "manifest `max_seq_len` is a string", _manifest(
        lambda m: m["model"].update(max_seq_len="512")), r"max_seq_len", ("bundle", "image")),
    Case("bundle-outside-path", "manifest names a file outside the bundle (`../`)", _manifest(
        lambda m: m.update(preprocessing="../x.json")), r"outside the bundle", ("bundle", "image")),
    Case("bundle-version", "manifest of an unknown format version", _manifest(
        lambda m: m.update(format_version=99)), r"manifest\.json: unknown format_version 99", ("bundle", "image")),
    # ---- checkpoint config.json fields of the wrong type, and output paths that cannot be folders
    Case("config-hidden-size-string", "checkpoint config.json with `hidden_size: \"64\"`",
         lambda tmp, ckpt: ["info", _config_edit(ckpt, tmp, lambda d: d.update(hidden_size="64"))], r"hidden_size",
         ("ckpt",)),
    Case("config-vocab-null", "checkpoint config.json with `vocab_size: null` (train)",
         lambda tmp, ckpt, data: ["train", "--method", "baseline", "--student",
                                  _config_edit(ckpt, tmp, lambda d: d.update(vocab_size=None)), "--data", data,
                                  "steps=1", "progress=false", "--output-dir", tmp / "o"], r"vocab_size", ("ckpt", "data")),
    Case("config-a-list", "checkpoint config.json that is a JSON list", lambda tmp, ckpt: [
        "info", _config_edit(ckpt, tmp, lambda d: [1, 2])], r"config\.json", ("ckpt",)),
    Case("train-output-under-a-file", "`train --output-dir` inside a path that is a file",
         lambda tmp, data: _train("--data", data, "--output-dir", _bytes(tmp / "afile", b"x") / "sub"), r"afile",
         ("data",)),
    Case("train-output-is-the-teacher", "`train --output-dir` that is the teacher's folder (trained over it)",
         lambda tmp, ckpt: _into_teacher(_copy(ckpt, tmp, "t")), r"output_dir .*/t is the teacher folder", ("ckpt",)),
    Case("eval-output-is-a-file", "`eval --output-dir` that is a file", lambda tmp: [
        "eval", "--answers", _bytes(tmp / "a.jsonl", b'{"question_id": "1", "text": "yes"}\n'), "--bench", "easyvqa",
        "--output-dir", _bytes(tmp / "afile", b"x")], r"afile"),
    Case("eval-answers-no-rows", "`eval --answers` of a file with no answer rows", lambda tmp: [
        "eval", "--answers", _bytes(tmp / "a.jsonl", b"not json\n[1, 2]\n"), "--bench", "easyvqa", "--output-dir",
        tmp / "o"], r"a\.jsonl.*no answer rows"),
    Case("export-overwrite-a-file", "`export --overwrite` onto a path that is a file", lambda tmp, ckpt: [
        "export", ckpt, "--output-dir", _bytes(tmp / "afile", b"x"), "--overwrite"], r"afile.*not a folder", ("ckpt",)),
    Case("export-empty-quant", "`export --quant ''`", lambda tmp, ckpt: [
        "export", ckpt, "--output-dir", tmp / "o", "--quant", ""], r"--quant", ("ckpt",)),
    Case("bench-output-under-a-file", "`bench --output-dir` inside a path that is a file (refused before the runs)",
         lambda tmp, bundle: ["bench", bundle, "--n-runs", "1", "--output-dir", _bytes(tmp / "afile", b"x") / "sub"],
         r"afile", ("bundle",)),
]


def _into_teacher(teacher: Path) -> list:
    return ["train", "--method", "logit-kd", "--teacher", teacher, "--student", "tiny-student", "steps=2",
            "batch_size=2", "data.limit=8", "progress=false", "--output-dir", teacher]


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _corrupt_image(data: Path, tmp: Path) -> Path:
    d = _copy(data.parent, tmp, "data")
    img = d / "1.png"
    img.write_bytes(img.read_bytes()[:80])
    return d / data.name


def _truncated_weights(ckpt: Path, tmp: Path) -> Path:
    c = _copy(ckpt, tmp, "student")
    w = c / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return c


def _config_edit(ckpt: Path, tmp: Path, fn: Callable[[dict], object]) -> Path:
    """A copy of the checkpoint whose config.json is what `fn` makes of it (an edit in place, or a new value)."""
    c = _copy(ckpt, tmp, "student")
    d = json.loads((c / "config.json").read_text())
    new = fn(d)
    (c / "config.json").write_text(json.dumps(d if new is None else new))
    return c


def _bad_eos(ckpt: Path, tmp: Path) -> Path:
    c = _copy(ckpt, tmp, "student")
    _edit_json(c / "config.json", lambda d: d.update(eos_token_id=5))
    return c


def _truncated(image: Path, tmp: Path) -> Path:
    out = tmp / "cut.png"
    out.write_bytes(image.read_bytes()[:60])
    return out


def _tampered(bundle: Path, tmp: Path) -> Path:
    b = _copy(bundle, tmp, "b")
    f = b / "template.json"
    f.write_text(f.read_text().replace("USER", "USEr"))
    return b


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_error_line(case: Case, tmp_path, request):
    fixtures = {name: request.getfixturevalue(name) for name in case.fixtures}
    work = tmp_path / "work"
    work.mkdir()
    args = case.argv(work, **fixtures)
    before = listing(work)
    r = cli(*args, cwd=work)
    assert_one_error(r, case.names)
    assert listing(work) == before, "a refused command left files behind"


# ------------------------------------------------------------------------------------------------ faults
KILLER = """
import os, signal, sys
import alignkd.fileio as fileio
import alignkd.model.checkpoint as checkpoint
marker = os.environ["ALIGNKD_TEST_KILL_AT"]
sig = getattr(signal, os.environ.get("ALIGNKD_TEST_SIGNAL", "SIGKILL"))
real = checkpoint.save_file
def save_file(tensors, filename, metadata=None):  # kill -9 halfway through writing the marked file
    if marker in str(filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, filename, metadata=metadata)
checkpoint.save_file = save_file
real_publish = fileio.publish_dir
def publish_dir(tmp, final, merge=False):  # kill -9 (or sig) with the new folder complete but not yet in place
    if os.path.basename(str(final)) == marker:
        os.kill(os.getpid(), sig)
    return real_publish(tmp, final, merge)
fileio.publish_dir = publish_dir
real_stage_publish = fileio.StagedDir.publish
def stage_publish(self, merge=False):  # the same moment, for a folder published without --overwrite
    if self.final.name == marker:
        os.kill(os.getpid(), sig)
    return real_stage_publish(self, merge)
fileio.StagedDir.publish = stage_publish
from alignkd.cli import main
sys.argv = ["alignkd-mobile", *sys.argv[1:]]
main()
"""


def killed_cli(marker: str, *args, sig: str = "SIGKILL") -> subprocess.CompletedProcess:
    env = {**os.environ, "ALIGNKD_TEST_KILL_AT": marker, "ALIGNKD_TEST_SIGNAL": sig, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", KILLER, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


def _losses(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
            for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole_run(data, tmp_path_factory) -> Path:
    """The uninterrupted reference: 4 steps, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("whole") / "run"
    r = cli(*_train("--data", data, "steps=4", "save_every=2", "--output-dir", out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("where", ["model.safetensors", "step-000004"])
def test_kill_during_a_checkpoint_write_keeps_the_previous_and_resumes_exactly(where, data, whole_run, tmp_path):
    out = tmp_path / "run"
    args = _train("--data", data, "steps=4", "save_every=2", "--output-dir", out)
    marker = ".step-000004.tmp-" if where == "model.safetensors" else where
    r = killed_cli(marker, *args)
    assert r.returncode == -signal.SIGKILL
    ckpts = out / "train" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step-000002"]
    assert any(p.name.startswith(".step-000004.tmp-") for p in ckpts.iterdir())  # what the kill left
    r = cli(*args)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"resum\w* .*step 2", r.stderr + r.stdout), (r.stderr + r.stdout)[-2000:]
    assert _losses(out) == _losses(whole_run)  # as if never killed
    assert not [p for p in out.rglob(".*tmp-*")]  # the dead writer's temp folder is gone


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_during_an_export_removes_its_temp_folder_and_says_so(ckpt, tmp_path, sig):
    """SIGTERM (a scheduler, torchrun) and SIGHUP (a closed terminal) ended the process where it stood, silently,
    leaving a bundle's worth of `.bundle.tmp-*` folder until a later export into the same name."""
    r = killed_cli("bundle", "export", ckpt, "--target", "desktop", "--format", "gguf", "--quant", "fp32",
                   "--output-dir", tmp_path / "bundle", sig=sig)
    assert r.returncode == 128 + getattr(signal, sig), r.stderr[-2000:]
    assert r.stderr.splitlines()[-1] == f"stopped by {sig}" and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no bundle, no temp folder


def test_resuming_into_another_runs_folder_is_refused_naming_what_differs(data, ckpt, whole_run, tmp_path):
    out = _copy(whole_run, tmp_path, "run")
    before = listing(out)
    r = cli("train", "--method", "logit-kd", "--teacher", ckpt, "--student", "tiny-student", "--data", data, "steps=4",
            "save_every=2", "batch_size=2", "progress=false", "--output-dir", out)
    assert_one_error(r, r"method")
    assert listing(out) == before


@pytest.fixture()
def small_disk(tmp_path):
    def mount(size_kib: int) -> Path:
        mnt = tmp_path / f"disk{size_kib}"
        mnt.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
                                               capture_output=True).returncode:
            pytest.skip("a small tmpfs needs root (CI runs as root)")
        mounted.append(mnt)
        return mnt

    mounted: list[Path] = []
    yield mount
    for m in mounted:
        subprocess.run(["umount", str(m)], check=False)


def _kib(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) // 1024


def test_full_disk_at_the_final_save_names_the_file_and_the_last_checkpoint(data, whole_run, small_disk):
    """A disk with room for the step-2 checkpoint and the run's small files, but not for the final student."""
    ckpt_kib = _kib(whole_run / "train" / "checkpoints" / "step-000002")
    disk = small_disk(ckpt_kib + 400)  # the final student alone needs more than the 400 KiB left
    out = disk / "run"
    r = cli(*_train("--data", data, "steps=4", "save_every=2", "--output-dir", out))
    line = assert_one_error(r, r"disk full while writing .*run/")
    assert "step-000002" in line, line
    assert (out / "train" / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    assert not [p for p in out.rglob(".*tmp-*")]  # nothing half-written left behind
