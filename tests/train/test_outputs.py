"""What a run writes, under faults: a full disk never takes the trained student without saying where the
last complete checkpoint is, names the file it was writing, leaves nothing half-written; every output
honours the umask."""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

import alignkd.model.checkpoint as ck
from alignkd.fileio import DiskFull
from alignkd.model import load_model
from alignkd.train.recipe import checkpoints, train


def _fill_disk_when(monkeypatch, marker: str):
    """safetensors writes into a staged folder whose name contains `marker` fail as on a full disk."""
    real = ck.save_file

    def save_file(tensors, filename, metadata=None):
        if marker in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", save_file)


def _temps(tmp_path):
    return sorted(p.name for p in tmp_path.rglob(".*tmp-*"))


def test_full_disk_at_the_final_save_names_the_file_and_the_last_checkpoint(tmp_path, small_run, monkeypatch):
    _fill_disk_when(monkeypatch, "/.run.tmp-")
    with pytest.raises(DiskFull) as e:
        train(small_run(method="baseline", teacher=None, save_every=2))
    ckpt = tmp_path / "run" / "train" / "checkpoints" / "step-000002"
    assert str(e.value) == (f"disk full while writing {tmp_path / 'run' / 'model.safetensors'}: no space left on device; "
                            f"the trained student (step 4) is not saved: the last complete checkpoint is {ckpt}: free "
                            "space and rerun the same command to resume from it")
    assert not (tmp_path / "run" / "model.safetensors").exists() and _temps(tmp_path) == []
    load_model(ckpt)
    monkeypatch.undo()  # space again: the same command resumes from step 2 and finishes
    assert train(small_run(method="baseline", teacher=None, save_every=2))["steps"] == 4
    load_model(tmp_path / "run")


def test_full_disk_after_the_final_student_keeps_it_and_says_so(tmp_path, small_run, monkeypatch):
    _fill_disk_when(monkeypatch, "/.step-000004.tmp-")
    with pytest.raises(DiskFull, match=r"step-000004/model.safetensors: no space left on device; the trained student "
                       rf"\(step 4\) is saved in {tmp_path / 'run'}$"):
        train(small_run(method="baseline", teacher=None, save_every=2))
    load_model(tmp_path / "run")
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-000002"] and _temps(tmp_path) == []


def test_full_disk_at_a_step_checkpoint_stops_naming_the_last_one(tmp_path, small_run, monkeypatch):
    _fill_disk_when(monkeypatch, "/.step-000004.tmp-")
    with pytest.raises(DiskFull, match=r"step-000004/model.safetensors: no space left on device; stopped at step 4: "
                       r"the last complete checkpoint is .*step-000002: free space"):
        train(small_run(method="baseline", teacher=None, save_every=2, steps=6))
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-000002"] and _temps(tmp_path) == []


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (a real full disk); needs root and mount, as in CI."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_real_full_disk_is_one_error_naming_the_student_file(tiny_disk, small_run):
    with pytest.raises(DiskFull) as e:
        train(small_run(method="baseline", teacher=None, output_dir=str(tiny_disk / "run")))
    assert str(e.value).startswith(f"disk full while writing {tiny_disk / 'run' / 'model.safetensors'}: no space left")
    assert str(e.value).endswith("is not saved: no checkpoint was written before (save_every=N keeps one every N steps)")
    assert not (tiny_disk / "run" / "model.safetensors").exists() and _temps(tiny_disk) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(tmp_path, small_run, umask):
    old = os.umask(umask)
    try:
        train(small_run(method="baseline", teacher=None, steps=2))
    finally:
        os.umask(old)
    out = tmp_path / "run"
    paths = [out, out / "model.safetensors", out / "config.json", out / "README.md", out / "vision_tower", out / "train",
             out / "train" / "metrics.jsonl", out / "train" / "summary.json", out / "train" / "loss_curve.png",
             out / "train" / "checkpoints" / "step-000002", out / "train" / "checkpoints" / "step-000002" / "trainer_state.pt"]
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
