"""What a rerun into an output_dir does: resume only the same run (others refused, naming what differs),
start fresh when asked, always checkpoint the final step, clear what killed writers left, read the data
before any weights."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from PIL import Image

import alignkd.train.recipe as recipe
from alignkd.errors import ConfigError, DataError
from alignkd.train.recipe import checkpoints, setup, train


def _names(out):
    return [p.name for p in checkpoints(out)]


def test_the_final_step_is_always_checkpointed(tmp_path, small_run):
    train(small_run(method="baseline", teacher=None, save_every=0))
    assert _names(tmp_path / "run") == ["step-000004"]
    train(small_run(method="baseline", teacher=None, steps=5, save_every=2, output_dir=str(tmp_path / "b")))
    assert _names(tmp_path / "b") == ["step-000004", "step-000005"]  # keep_last=2 of 2, 4 and the final 5


def test_a_run_into_a_folder_another_run_is_writing_is_refused(tmp_path, small_run, monkeypatch):
    """Two runs started together into one folder both passed the other-run check on the empty folder and mixed
    their files (exit 0 both); a resume beside a live run crashed on a checkpoint the live run pruned."""
    from alignkd.fileio import FolderLock, OutputPathError

    live = FolderLock(tmp_path / "run", "output_dir", "another training run")
    setup_before = recipe.setup

    def meanwhile(cfg):  # the other run makes and locks the folder while this one is in setup
        run = setup_before(cfg)
        (tmp_path / "run").mkdir(exist_ok=True)
        live.take()
        return run

    monkeypatch.setattr(recipe, "setup", meanwhile)
    with pytest.raises(OutputPathError, match="output_dir .*run is being written by another training run"):
        train(small_run(method="baseline", teacher=None))
    assert not (tmp_path / "run" / "train" / "config.yaml").exists()  # nothing of this run written
    monkeypatch.setattr(recipe, "setup", setup_before)
    with pytest.raises(OutputPathError, match="is being written by another training run"):  # an existing folder
        train(small_run(method="baseline", teacher=None))
    live.release()
    train(small_run(method="baseline", teacher=None))  # and once the other run ends, this one runs
    assert _names(tmp_path / "run") == ["step-000004"]


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path, small_run, capsys):
    base = small_run(method="baseline", teacher=None, save_every=2)
    train(base)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    for cfg, said in [(small_run(method="logit-kd", save_every=2), "method: 'baseline' → 'logit-kd'"),
                      (base.replace(steps=6), "steps: 4 → 6"),
                      (base.replace(lr=1e-4), "lr: 0.001 → 0.0001")]:
        with pytest.raises(ConfigError, match="holds checkpoints of another run \\(step-000004\\), with other settings: "
                           + said + r"\. Use another output_dir, or resume=false"):
            train(cfg)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before and _names(tmp_path / "run") == [
        "step-000002", "step-000004"]
    # what only changes how the run is executed or reported resumes: the finished run is done at once
    capsys.readouterr()
    assert train(base.replace(compile=False, log_every=2, keep_last=3))["steps"] == 4
    assert "(step 4 of 4)" in capsys.readouterr().err


def test_resume_false_starts_fresh_deleting_the_earlier_checkpoints(tmp_path, small_run, capsys):
    train(small_run(method="baseline", teacher=None, save_every=2))
    capsys.readouterr()
    summary = train(small_run(method="logit-kd", save_every=3, resume=False))
    assert f"starting fresh: removed 2 checkpoint(s) of an earlier run in {tmp_path / 'run' / 'train' / 'checkpoints'}" \
        in capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["kd"] > 0 for r in rows)
    assert _names(tmp_path / "run") == ["step-000003", "step-000004"] and summary["config"]["method"] == "logit-kd"


def test_temp_folders_of_killed_writers_are_removed_at_the_next_run(tmp_path, small_run):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "run"
    root = out / "train" / "checkpoints"
    stale = [root / f".step-000002.tmp-{dead.pid}-x1", out / "train" / f".metrics.jsonl.tmp-{dead.pid}",
             tmp_path / f".run.tmp-{dead.pid}-y2", out / f".vision_tower.old-{dead.pid}"]
    alive = root / f".step-000002.tmp-{os.getppid()}-z3"  # a writer still running: kept
    for p in stale + [alive]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.mkdir() if "step" in p.name or "run" in p.name else p.write_text("partial")
    setup(small_run(method="baseline", teacher=None))
    assert [p for p in stale if p.exists()] == [] and alive.is_dir()


def test_samples_and_images_are_checked_before_any_weights_load(tmp_path, small_run, monkeypatch):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"image": "ok.png", "conversations": conv}, {"image": "bad.png", "conversations": conv}]))

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the data was checked")

    monkeypatch.setattr(recipe, "build_model", no_weights)
    monkeypatch.setattr(recipe, "load_model", no_weights)
    cfg = small_run(data__path=str(data), data__image_folder=str(tmp_path / "img"))
    with pytest.raises(DataError, match=r"d.json: sample 1: image .*bad.png is not in an image format PIL reads"):
        setup(cfg)
    with pytest.raises(ConfigError, match="teacher=nope: neither a checkpoint directory nor a preset"):
        setup(cfg.replace(teacher="nope"))
