"""easy-vqa reader (through alignkd.data.easyvqa) and its exact-match scorer."""

from pathlib import Path

import pytest

from alignkd.data.templates import SHORT_ANSWER_PROMPT
from alignkd.eval.benchmarks import EasyVQA, EvalItem


def test_subset_is_seeded_and_ignores_data_root():
    items, stats = EasyVQA().load(None, limit=6)
    again, _ = EasyVQA().load(Path("/nonexistent"), limit=6)
    assert [it.id for it in items] == [it.id for it in again]
    assert [it.id for it in EasyVQA(seed=1).load(None, limit=6)[0]] != [it.id for it in items]
    assert len(items) == stats.n_rows == 6 and stats.n_malformed == 0
    assert all(it.question.endswith("\n" + SHORT_ANSWER_PROMPT) and Path(it.image).is_file() for it in items)


def test_score():
    items = [EvalItem(str(i), "x.png", "q", {"answer": a}) for i, a in enumerate(("teal", "no", "circle", "red"))]
    # "TEAL!" -> teal right; "No way" -> "no way" != "no": wrong, and not one of the 13 answers;
    # " Circle. " -> circle right; "3" unanswered: wrong -> 2 / 4
    m = EasyVQA().score(items, {"0": "TEAL!", "1": "No way", "2": " Circle. "})
    assert m["score"] == m["accuracy"] == pytest.approx(50.0)
    assert m["valid_answer_rate"] == pytest.approx(50.0) and m["n_missing"] == 1
