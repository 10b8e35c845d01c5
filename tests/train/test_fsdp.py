"""torchrun + FSDP2 on CPU (gloo): 2 processes give the losses of one process with the same global batch,
and a sharded run saves and resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # ~1-3 min on 2 cores: torchrun starts two processes twice

from alignkd.train.recipe import train

ARGS = ["method=alignkd", "teacher=tiny-teacher", "steps=4", "batch_size=2", "data.limit=16", "lr=1e-3",
        "save_every=2", "keep_last=5", "progress=false", "seed=0"]


def _torchrun(out: Path, *extra: str) -> None:
    exe = Path(sys.executable).with_name("alignkd-mobile")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "--no-python",
           str(exe), "train", "--output-dir", str(out), *ARGS, *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _losses(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    sharded = tmp_path / "fsdp"
    _torchrun(sharded)
    single = tmp_path / "single"
    kw = dict(a.split("=", 1) for a in ARGS)
    from alignkd.train.config import load_config

    train(load_config(None, [f"{k}={v}" for k, v in kw.items()] + ["grad_accum=2", f"output_dir={single}"]))
    a, b = _losses(sharded), _losses(single)
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for k in ("ce", "kd", "att", "v_all", "v_focus", "total"):
            # tolerance: gloo's reduce-scatter sums in another order than local accumulation
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)

    # save and resume under FSDP: drop everything after the step-2 checkpoint and run again
    first = _losses(sharded)
    for p in (sharded / "train" / "checkpoints").glob("step-*"):
        if p.name != "step-000002":
            shutil.rmtree(p)
    _torchrun(sharded)
    again = _losses(sharded)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for ra, rb in zip(first, again, strict=True):
        assert ra["total"] == pytest.approx(rb["total"], rel=1e-6), ra["step"]
    assert (sharded / "config.json").is_file() and (sharded / "train" / "adapters.safetensors").is_file()


def test_compiled_blocks_under_fsdp_give_the_same_losses(tmp_path):
    """compile=true then fully_shard per block: FSDP's hooks run inside the compiled blocks."""
    _torchrun(tmp_path / "compiled", "compile=true", "steps=2", "save_every=0")
    _torchrun(tmp_path / "eager", "steps=2", "save_every=0")
    a, b = _losses(tmp_path / "compiled"), _losses(tmp_path / "eager")
    assert [r["step"] for r in a] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        for k in ("ce", "kd", "att", "v_all", "v_focus", "total"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra["step"], k)


def test_two_processes_build_one_teacher_cache_and_train_from_it(tmp_path):
    """teacher-cache under torchrun: the ranks split the samples, rank 0 writes the manifest after both are
    done; the cache holds what one process writes, and a 2-process cached run gives the 1-process losses."""
    from alignkd.model import config_from_name
    from alignkd.train.config import load_config
    from alignkd.train.recipe import build_teacher_cache, cache_spec
    from alignkd.train.teacher_cache import TeacherCache

    exe = Path(sys.executable).with_name("alignkd-mobile")
    keys = ["teacher=tiny-teacher", "data.limit=16", "loss.kd_topk=8", "batch_size=2", "progress=false", "seed=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518", "--no-python",
           str(exe), "teacher-cache", "--output-dir", str(tmp_path / "two"), *keys]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["processes"] == 2 and json.loads(r.stdout)["samples"] == 16
    assert {p.name for p in (tmp_path / "two").glob("progress-r*.json")} == {"progress-r0.json", "progress-r1.json"}
    cfg = load_config(None, keys + [f"teacher_cache={tmp_path / 'one'}"])
    build_teacher_cache(cfg)
    spec = cache_spec(cfg, config_from_name("tiny-teacher"))
    one, two = TeacherCache(tmp_path / "one", spec), TeacherCache(tmp_path / "two", spec)
    assert set(one) == set(two) and len(one) == 16
    for key in one:
        a, b = one.lookup(key), two.lookup(key)
        assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=2e-3)  # other batches: other padding
    _torchrun(tmp_path / "fsdp", f"teacher_cache={tmp_path / 'two'}", "loss.kd_topk=8", "save_every=0", "steps=2")
    single = tmp_path / "single"
    kw = dict(a.split("=", 1) for a in ARGS)
    train(load_config(None, [f"{k}={v}" for k, v in kw.items()] + ["grad_accum=2", f"output_dir={single}", "steps=2",
                                                                   "save_every=0", f"teacher_cache={tmp_path / 'two'}",
                                                                   "loss.kd_topk=8"]))
    for ra, rb in zip(_losses(tmp_path / "fsdp"), _losses(single), strict=True):
        for k in ("ce", "kd", "att", "v_all", "v_focus", "total"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
