"""A small, fast run config for the recipe tests."""

from __future__ import annotations

import pytest

from alignkd.train.config import TrainConfig, load_config


@pytest.fixture()
def small_run(tmp_path):
    """small_run(**keys) → a 4-step tiny Align-KD TrainConfig writing to tmp_path/run; keyword arguments
    are config keys, `__` standing for a group's dot (data__limit=8)."""

    def make(**kw) -> TrainConfig:
        base = {"method": "alignkd", "teacher": "tiny-teacher", "steps": 4, "batch_size": 2, "data.limit": 24,
                "lr": 1e-3, "output_dir": str(tmp_path / "run"), "progress": False, "seed": 0}
        base.update({k.replace("__", "."): v for k, v in kw.items()})
        return load_config(flags=base)

    return make
