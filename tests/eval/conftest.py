"""Shared by the eval tests: the hand-made fixtures (tests/assets/eval, laid out as LLaVA-1.5's
playground/data/eval) and scoring a list of answer-file rows the way `eval --answers` does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from alignkd.eval.answers import match_answers

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "eval"


@pytest.fixture()
def assets() -> Path:
    return ASSETS


@pytest.fixture()
def copy_assets(tmp_path):
    """copy_assets("gqa/data", "release/gqa") copies a fixture folder to tmp_path/<dest> (to rearrange it)."""

    def copy(src: str, dest: str) -> Path:
        out = tmp_path / dest
        shutil.copytree(ASSETS / src, out)
        return out

    return copy


@pytest.fixture()
def score_rows():
    """score_rows(bench, items, stats, rows) -> (metrics, Matched): rows are answer-file objects."""

    def score(bench, items, stats, rows):
        m = match_answers(rows, {it.id for it in items}, bench.answer_keys, stats.unscored)
        return bench.score(items, m.predictions), m

    return score


def row(question_id, prompt, text, **extra) -> dict:
    """One line of a LLaVA / MobileVLM answer file."""
    return {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m",
            "metadata": {}, **extra}


@pytest.fixture()
def answer():
    return row
