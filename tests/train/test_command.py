"""`alignkd-mobile train` / `train-keys` as a user types them: the demo is an explicit mode, a bad config is
one `error:` line with exit status 2 before anything loads, every key is listed."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import alignkd.train.recipe as recipe
from alignkd.cli import main


@pytest.fixture()
def cli(monkeypatch):
    def nothing_runs(*a, **k):
        raise AssertionError("a bad command got as far as training")

    monkeypatch.setattr(recipe, "setup", nothing_runs)
    return lambda *args: CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args, said", [
    (["steps=5"], "method alignkd needs a teacher"),  # a training key, as lr=1e-3 is: never the demo
    (["teacher_steps=5"], "teacher_steps: key(s) of the demo, not of a training run; run the demo with: "
                          "alignkd-mobile train --demo teacher_steps=5"),
    # the suggested command leaves out steps, a key the demo does not have (lr it has)
    (["steps=1", "teacher_steps=5", "lr=1e-3"], "run the demo with: alignkd-mobile train --demo teacher_steps=5 lr=1e-3\n"),
    (["--demo", "student_preset=nope"], "student_preset 'nope' is not a preset (known: "),
    (["--demo", "teacher_preset=nope"], "teacher_preset 'nope' is not a preset (known: "),
    (["--demo", "--teacher", "x"], "--demo takes --config, --output-dir and the demo's keys"),
    (["--demo", "steps=5"], "unknown config key(s) steps; alignkd-mobile train-keys --demo lists them"),
    (["--teacher", "t", "stepz=5"], "unknown config key(s) stepz; alignkd-mobile train-keys lists them"),
    (["--teacher", "t", "teacher_dtype=banana"], "teacher_dtype must be one of auto, bf16, fp16, fp32, got 'banana'"),
    (["--teacher", "t", "lr=-1"], "lr must be > 0, got -1.0"),
    (["--teacher", "t", "loss.kd_positions=x"], "loss: kd_positions must be one of text, tokens, all"),
    (["--config", "/"], "config file / is a directory, not a YAML file"),
])
def test_bad_train_commands_are_one_error_line(cli, args, said):
    r = cli("train", *args)
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and said in r.stderr


def test_a_bad_yaml_is_one_line(cli, tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("method: alignkd\nloss:\n  temperature: [2\n")
    r = cli("train", "--config", str(y))
    assert r.exit_code == 2 and r.stderr == f"error: {y} is not valid YAML at line 4, column 1: " \
                                            "expected ',' or ']', but got '<stream end>'\n"


def test_train_keys_lists_nested_keys_and_the_demos():
    out = CliRunner().invoke(main, ["train-keys"]).stdout
    assert "loss.temperature = 1.0\n    KD softmax temperature" in out and "data.path = 'easyvqa'\n" in out
    assert "\nloss = " not in out and "teacher_steps" not in out
    demo = CliRunner().invoke(main, ["train-keys", "--demo"]).stdout
    assert "eval_seed = 0\n" in demo and "teacher_steps = 600\n" in demo


def test_train_keys_lists_the_teacher_cache_keys():
    out = CliRunner().invoke(main, ["train-keys"]).stdout
    for key in ("teacher_cache = None\n    Folder of an offline teacher cache", "teacher_cache_missing = 'fail'\n",
                "loss.kd_topk = None\n    KD over the teacher's k most likely tokens", "loss.kd_tail = 'rest'\n"):
        assert key in out


def _cli(*args, cwd=None):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("alignkd-mobile")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_teacher_cache_command_builds_resumes_and_refuses_another_run(tmp_path):
    import json

    args = ["teacher-cache", "--teacher", "tiny-teacher", "--output-dir", str(tmp_path / "c"), "data.limit=6",
            "batch_size=4", "progress=false"]
    r = _cli(*args, "loss.kd_topk=8")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["samples"], summary["computed_now"], summary["k"]) == (6, 6, 8)
    assert summary["kd_positions"] >= 6 and summary["bytes_per_kd_position"] > 32  # 8 × 4 bytes + per-sample keys
    planned, done = r.stderr.splitlines()[:2]
    assert planned == f"teacher cache {tmp_path / 'c'}: 6 samples to compute, {summary['kd_positions']} KD positions: " \
                      f"about {summary['kd_positions'] * 8 * 4 + 6 * 40} bytes at k = 8"  # fp16 + uint16, key + offset
    assert done.startswith(f"teacher cache {tmp_path / 'c'}: 6 samples (6 computed now), ")
    manifest = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert manifest["complete"] and manifest["spec"]["k"] == 8 and manifest["spec"]["teacher"]["preset"] == "tiny-teacher"
    r = _cli(*args, "loss.kd_topk=8")  # a finished cache: nothing left to compute
    assert r.returncode == 0 and json.loads(r.stdout)["computed_now"] == 0 and json.loads(r.stdout)["samples"] == 6
    r = _cli(*args, "loss.kd_topk=16")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == f"error: teacher cache {tmp_path / 'c'} was made for another run (cache.json): k: cache 8, run 16\n"


@pytest.mark.parametrize("args, said", [
    (["--teacher", "tiny-teacher"], "teacher-cache needs the cache folder: --output-dir DIR"),
    (["--teacher", "tiny-teacher", "--output-dir", "c", "loss.variant=release"],
     "teacher_cache needs loss.kd_positions text or tokens"),
    (["--output-dir", "c"], "method alignkd needs a teacher"),
    (["--teacher", "tiny-teacher", "--output-dir", "c", "method=baseline"], "method baseline uses no teacher"),
    (["--teacher", "nope/dir", "--output-dir", "c"], "teacher=nope/dir: neither a checkpoint directory nor a preset"),
])
def test_bad_teacher_cache_commands_are_one_error_line(tmp_path, monkeypatch, args, said):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["teacher-cache", *args])
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and said in r.stderr
    assert not (tmp_path / "c").exists()
