"""easy-vqa's held-out split (the embedded demo task): no files to find, the `easy-vqa` package ships it.

Read through `alignkd.data.easyvqa` (the one easy-vqa reader). Prompt: question + short-answer
instruction. question_id: the question's position in the package's test list. Score (ours, not an
official benchmark): exact match after lower-case, punctuation removal and whitespace squeezing;
also the share of replies that are one of the 13 answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from alignkd.data import easyvqa

from alignkd.data.templates import short_answer

from .. import scoring
from .base import Benchmark, EvalItem, LoadStats, check_limit, mean_scores


class EasyVQA(Benchmark):
    name = "easyvqa"
    rule = "exact match after lower-case, punctuation removal and whitespace squeezing (alignkd's own task)"

    def __init__(self, seed: int = 0):
        self.seed = seed  # picks the `limit` subset

    def load(self, data_root: Path | None = None, limit: int | None = None) -> tuple[list[EvalItem], LoadStats]:
        check_limit(limit)
        qs = easyvqa.questions("test", limit=limit, seed=self.seed)
        stats = LoadStats(n_rows=len(qs), source="the easy-vqa package's test split")
        if limit is not None:
            stats.notes.append(f"a seeded random subset of {len(qs)} questions (seed {self.seed})")
        items = [EvalItem(str(q.index), str(q.image), short_answer(q.question), {"answer": q.answer}) for q in qs]
        return items, stats

    def score(self, items: list[EvalItem], predictions: Mapping[str, str]) -> dict[str, float]:
        def judge(p: str, it: EvalItem) -> dict[str, float]:
            p = scoring.normalize_short_answer(p)
            return {"accuracy": p == scoring.normalize_short_answer(it.meta["answer"]),
                    "valid_answer_rate": p in easyvqa.ANSWERS}

        return mean_scores(items, predictions, judge)
