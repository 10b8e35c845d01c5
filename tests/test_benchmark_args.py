"""Bad input to benchmarks/easyvqa_seeds.py, export_full_shape.py, train_step.py and parity_gates.py: one `prog: error:` naming the
argument, exit 2, no traceback, before any work; and the documented commands parse as meant. Parsing only:
nothing here trains or exports."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the scripts are not a package: they import each other by file name

import easyvqa_seeds as seeds  # noqa: E402
import export_full_shape as export  # noqa: E402


def _refused(parse, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# ============================================================================ easyvqa_seeds.py
# README.md's commands (paths shortened) and the script's own --help
DOCUMENTED = [
    "--seeds 0-9 --output-dir OUT/study8 --results docs/results/easyvqa_seeds --alignment-samples 256",
    ("--curve --seeds 2 methods=baseline,alignkd student_steps=800 curve_every=100 kd_from_cache=false "
     "vision_feature_memo_gb=0"),
    "--curve --seeds 2 --output-dir OUT/study8 --results OUT/curve8-seed2 methods=baseline,alignkd curve_every=100",
    ("--seeds 0-9 --output-dir OUT/study7 --results docs/results/easyvqa_seeds-cache --alignment-samples 0 "
     "kd_from_cache=false methods=baseline,alignkd,alignkd-cache-k8,alignkd-cache-k32,alignkd-cache-full --pairs "
     "alignkd-cache-k8:alignkd,alignkd-cache-k32:alignkd,alignkd-cache-full:alignkd"),
] + [line.split("easyvqa_seeds.py", 1)[1].split("#")[0] for line in seeds.__doc__.splitlines()
     if line.strip().startswith("python benchmarks/easyvqa_seeds.py")]


@pytest.mark.parametrize("command", DOCUMENTED)
def test_the_documented_commands_parse(command, tmp_path):
    a, got, _, _ = seeds.parse(shlex.split(command.replace("OUT", str(tmp_path))))
    assert got and all("=" not in o for o in a.seeds)
    assert all("=" in o for o in a.overrides)
    assert not list(tmp_path.iterdir())  # parsing makes nothing


def test_seeds_then_overrides_then_options(tmp_path):
    a, got, d, pairs = seeds.parse(shlex.split(
        "--curve --seeds 2 methods=baseline,alignkd student_steps=800 curve_every=100 kd_from_cache=false "
        f"vision_feature_memo_gb=0 --output-dir {tmp_path}/X --results {tmp_path}/r"))
    assert got == [2]
    assert a.overrides == ["methods=baseline,alignkd", "student_steps=800", "curve_every=100", "kd_from_cache=false",
                           "vision_feature_memo_gb=0"]
    assert (d.methods, d.student_steps, d.curve_every, d.kd_from_cache, d.vision_feature_memo_gb) == (
        "baseline,alignkd", 800, 100, False, 0)
    assert d.output_dir == f"{tmp_path}/X" and pairs == []
    a, got, d, _ = seeds.parse(["--seeds", "0", "1", "5-6", "eval_limit=100", "--workers", "1", "lr=0.01"])
    assert got == [0, 1, 5, 6] and (d.eval_limit, d.lr) == (100, 0.01)


@pytest.mark.parametrize("argv, says", [
    (["--seeds", "abc"], "--seeds: 'abc'"),
    (["--seeds", "-1"], "--seeds: '-1'"),
    (["--seeds", "5-2"], "--seeds: '5-2' is an empty range"),
    (["--seeds", "0-"], "--seeds: '0-'"),
    (["--seeds", "1", "x-3"], "--seeds: 'x-3'"),
    (["--seeds", "methods=baseline"], "--seeds: no seeds"),
    (["foo=1"], "unknown config key(s) foo"),
    (["student_steps=abc"], "student_steps: 'abc' is not an integer"),
    (["methods=foo"], "got 'foo'"),
    (["vision_feature_memo_gb=-1"], "vision_feature_memo_gb must be >= 0"),
    (["student_preset=nonesuch"], "student_preset 'nonesuch' is not a preset (known: "),
    (["student_steps"], "'student_steps' is not key=value"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "-2"], "--workers must be at least 1"),
    (["--alignment-samples", "-1"], "--alignment-samples must be >= 0"),
    (["--pairs", "alignkd:nope"], "--pairs alignkd:nope"),
])
def test_seeds_refuses_bad_input(argv, says, capsys):
    assert says in _refused(seeds.parse, argv, capsys)


def test_seed_list():
    assert seeds.seed_list(["0-3", "7", "2", "4-4"]) == [0, 1, 2, 3, 4, 7]
    for bad in ("", "-1", "1-", "3-1", "1.5", "1-2-3"):
        with pytest.raises(ValueError, match="seed|range"):
            seeds.seed_list([bad])


# ============================================================================ export_full_shape.py
@pytest.mark.parametrize("argv, says", [
    (["--jobs", "bogus"], "--jobs: unknown job(s) 'bogus' (known: android, onnx"),
    (["--jobs", ""], "--jobs: unknown job(s) ''"),
    (["--update", "--jobs", "onnx,bogus"], "--jobs: unknown job(s) 'bogus'"),
    (["--jobs", "onnx,"], "--jobs: unknown job(s) ''"),
    (["--preset", "nonesuch"], "--preset: unknown preset 'nonesuch'"),
])
def test_export_refuses_bad_arguments_before_making_anything(argv, says, tmp_path, capsys):
    assert says in _refused(export.parse, ["--work", str(tmp_path / "w"), *argv], capsys)
    assert not (tmp_path / "w").exists()


def test_export_refuses_a_file_for_a_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert "--work:" in _refused(export.parse, ["--work", str(tmp_path / "f")], capsys)
    assert "--work:" in _refused(export.parse, ["--work", str(tmp_path / "f" / "sub")], capsys)
    assert "--out:" in _refused(export.parse, ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "f")], capsys)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("text, says", [
    ('{"preset": "tiny-stu', "is not readable JSON"),
    ("", "is not readable JSON"),
    (b"\xff\xfe", "is not readable JSON"),
    ("[1, 2]", "is not this script's results"),
    ('{"jobs": {}}', "is not this script's results"),
    ('{"preset": "tiny-student", "jobs": []}', "is not this script's results"),
    ('{"preset": "tiny-student", "jobs": {"onnx": 3}}', "is not this script's results"),
    ('{"preset": "mobilevlm-v2-1.7b", "checkpoint": {}, "jobs": {}}', "is of mobilevlm-v2-1.7b, not tiny-student"),
])
def test_export_update_refuses_a_bad_earlier_json(text, says, tmp_path, capsys):
    f = tmp_path / "export_full_shape.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    err = _refused(export.parse, ["--work", str(tmp_path), "--update", "--jobs", "onnx", "--preset", "tiny-student"],
                   capsys)
    assert f"--update: {f}" in err and says in err


def test_export_update_keeps_the_earlier_rows(tmp_path):
    earlier = {"preset": "tiny-student", "checkpoint": {}, "jobs": {"gguf": {"wall_s": 1.0}}}
    (tmp_path / "export_full_shape.json").write_text(json.dumps(earlier))
    a = export.parse(["--work", str(tmp_path), "--update", "--jobs", "onnx,android", "--preset", "tiny-student"])
    assert a.earlier == earlier and a.jobs == ["onnx", "android"]
    assert export.parse(["--work", str(tmp_path), "--preset", "tiny-student"]).earlier is None  # no --update


def test_export_relative_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the exports run with cwd=REPO: a relative --work must not land there
    a = export.parse(["--work", "w", "--out", "o/x"])
    assert a.work == tmp_path / "w" and a.out == tmp_path / "o" / "x"
    assert a.work.is_dir() and a.out.is_dir()
    assert export.parse(["--work", "w"]).out == tmp_path / "w"


# ============================================================================ as scripts: no traceback
@pytest.mark.parametrize("script, argv, says", [
    ("easyvqa_seeds.py", ["--seeds", "abc"], "easyvqa_seeds.py: error: --seeds: 'abc'"),
    ("export_full_shape.py", ["--work", "{tmp}/w", "--jobs", "bogus"], "export_full_shape.py: error: --jobs:"),
    ("train_step.py", ["--tiny", "--kinds", "plain,bogus"], "train_step.py: error: --kinds: unknown step 'bogus'"),
    ("train_step.py", ["--tiny", "--cache-k", "100000"], "train_step.py: error: --cache-k 100000 is more than"),
    ("train_step.py", ["--tiny", "--batch", "0"], "train_step.py: error: --batch must be at least 1"),
    ("train_step.py", ["--tiny", "--kinds", "plain,cache-build+compile"], "cache-build takes no modifier"),
    ("parity_gates.py", ["--formats", "gguf,tflite"], "parity_gates.py: error: --formats: unknown format tflite"),
])
def test_scripts_exit_2_with_one_line(script, argv, says, tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / script), *[x.format(tmp=tmp_path) for x in argv]],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and says in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "w").exists()
