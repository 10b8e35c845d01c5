"""Shared fixtures: tiny presets of the real classes, seeded; nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs beside other work.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_student():
    from alignkd.model import build_model, spread_norms

    return spread_norms(build_model("tiny-student", seed=0), seed=0)


@pytest.fixture(scope="session")
def tiny_teacher():
    from alignkd.model import build_model, spread_norms

    return spread_norms(build_model("tiny-teacher", seed=1), seed=1)


@pytest.fixture()
def pixels():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 48, 48, generator=g)


@pytest.fixture(scope="session")
def tok():
    """The packaged tiny tokenizer, through load_tokenizer (HF fast tokenizer)."""
    from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir

    return load_tokenizer(tiny_tokenizer_dir())


@pytest.fixture(scope="session")
def sp():
    """The same tokenizer through SentencePiece itself: the independent reference for its ids."""
    import sentencepiece as spm

    from alignkd.model.tokenizer import tiny_tokenizer_dir

    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir() / "tokenizer.model"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny student checkpoint (mtgv format + tokenizer) as `train` writes one; one copy per test module
    (a module may define its own `ckpt`)."""
    from alignkd.model import build_model, save_model, spread_norms
    from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir

    out = tmp_path_factory.mktemp("ckpt") / "student"
    save_model(spread_norms(build_model("tiny-student", seed=0), seed=0), out, tokenizer=load_tokenizer(tiny_tokenizer_dir()))
    return out
