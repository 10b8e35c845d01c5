"""Shared fixtures: tiny presets of the real classes, seeded; nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs beside other work.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_student():
    from alignkd.model import build_model

    return build_model("tiny-student", seed=0)


@pytest.fixture(scope="session")
def tiny_teacher():
    from alignkd.model import build_model

    return build_model("tiny-teacher", seed=1)


@pytest.fixture()
def pixels():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 48, 48, generator=g)
