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
    (["--demo", "--teacher", "x"], "--demo takes --config, --output-dir and the demo's keys"),
    (["--demo", "steps=5"], "unknown config key(s) steps"),
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
