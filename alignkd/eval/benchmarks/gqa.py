"""GQA testdev-balanced (12,578 questions), as LLaVA-1.5 / MobileVLM score it.

Files (`data_root` = the folder below, or a folder holding it as `gqa/`):
  release (questions1.2.zip + images.zip in one folder), also MobileVLM's data/benchmark_data/gqa:
      testdev_balanced_questions.json  ({qid: {"imageId", "question", "answer", "types", "isBalanced"}})
      images/{imageId}.jpg
  LLaVA-1.5 (playground/data/eval/gqa): data/testdev_balanced_questions.json + data/images/{imageId}.jpg
  (llava_gqa_testdev_balanced.jsonl, beside data/, holds the same prompts and ids; not needed)

Prompt: question + short-answer instruction. question_id: the GQA question id.
Score (LLaVA's scripts/convert_gqa_for_eval.py, then GQA's eval.py): the prediction is
`text.rstrip('.').lower()` and nothing else, right iff equal to the question's "answer"; accuracy
over the questions with isBalanced (eval.py's "Accuracy"), also per structural type and binary /
open ("query" questions are open). Unbalanced questions are known but not scored. eval.py refuses a
prediction file with a balanced question missing; here a missing answer scores as wrong and is counted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from alignkd.errors import DataError

from alignkd.data.templates import short_answer

from .. import scoring
from .base import (Benchmark, EvalItem, Layout, LoadStats, check_limit, locate, missing_fields, prediction,
                   read_json)

QUESTIONS = "testdev_balanced_questions.json"
FORMAT = '{qid: {"imageId", "question", "answer", ...}} JSON'
LAYOUTS = (
    Layout("the release / MobileVLM's gqa/", QUESTIONS, f"{QUESTIONS} + images/{{imageId}}.jpg"),
    Layout("LLaVA-1.5's playground/data/eval/gqa", f"data/{QUESTIONS}", f"data/{QUESTIONS} + data/images/{{imageId}}.jpg"),
)


class GQA(Benchmark):
    name = "gqa"
    rule = ("GQA eval.py accuracy over the balanced testdev questions; prediction = LLaVA convert_gqa_for_eval's "
            "text.rstrip('.').lower(), right iff equal to the answer")

    def load(self, data_root: Path | None, limit: int | None = None) -> tuple[list[EvalItem], LoadStats]:
        check_limit(limit)
        folder, layout = locate(self.name, data_root, ("gqa",), LAYOUTS)
        path = folder / layout.marker
        images = path.parent / "images"
        data = read_json(path, self.name, FORMAT)
        if not isinstance(data, dict):
            raise DataError(f"gqa: {path} must hold a JSON object {FORMAT}")
        stats = LoadStats(source=f"{layout.name}: {path}")
        items = []
        for qid, q in data.items():
            qid = str(qid)
            if isinstance(q, dict) and q.get("isBalanced") is False:
                stats.skip(qid)
                continue
            if limit is not None and len(items) >= limit:
                stats.skip(qid)
                continue
            stats.n_rows += 1
            where = f"{path.name}[{qid}]"
            if not isinstance(q, dict):
                stats.add_malformed(where, "entry is not an object")
                continue
            if reason := missing_fields(q, ("imageId", "question", "answer")):
                stats.add_malformed(where, reason)
                continue
            img = images / f"{q['imageId']}.jpg"
            if not img.is_file():
                stats.add_malformed(where, f"image {img} not found")
                continue
            types = q.get("types") if isinstance(q.get("types"), dict) else {}
            meta = {"answer": q["answer"], "structural": types.get("structural")}
            items.append(EvalItem(qid, str(img), short_answer(q["question"]), meta))
        return items, stats

    def score(self, items: list[EvalItem], predictions: Mapping[str, str]) -> dict[str, float]:
        right = missing = 0
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # name -> [right, total]
        for it in items:
            p, miss = prediction(predictions, it)
            missing += miss
            ok = scoring.normalize_gqa_answer(p) == it.meta["answer"]
            right += ok
            structural = it.meta.get("structural")
            if structural:
                for g in (f"accuracy_{structural}", "open" if structural == "query" else "binary"):
                    groups[g][0] += ok
                    groups[g][1] += 1
        n = len(items)
        out = {"score": scoring.percent(right, n), "accuracy": scoring.percent(right, n)}
        out.update({g: scoring.percent(r, t) for g, (r, t) in sorted(groups.items())})
        out.update(n=float(n), n_missing=float(missing))
        return out
