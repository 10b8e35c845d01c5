"""POPE on COCO val2014: the adversarial, random and popular splits, as LLaVA-1.5 / MobileVLM score it.

Files (`data_root` = the folder below, or a folder holding it as `pope/`):
  release (POPE's output/coco, e.g. at commit e3e39262 as LLaVA used it, random with 2,910 lines):
      coco_pope_{adversarial,random,popular}.json  (JSON lines {"question_id", "image", "text", "label"})
      val2014/{image}  (COCO val2014, beside them)
  LLaVA-1.5 / MobileVLM (playground/data/eval/pope, data/benchmark_data/pope):
      coco/coco_pope_{adversarial,random,popular}.json + val2014/{image}
  (llava_pope_test.jsonl beside coco/ holds the same prompts and ids; not needed)

Prompt: text + short-answer instruction. question_id: LLaVA's llava_pope_test.jsonl numbering, the
split's question_id plus 0 (adversarial), 10,000,000 (random) or 20,000,000 (popular), so that
eval_pope.py reads our answer files.
Score (LLaVA's eval_pope.py, per split): keep the reply up to its first '.', drop commas, split on
single spaces; "No", "not" or "no" among the words → no, anything else → yes; accuracy, precision,
recall, F1 (positive = yes), yes-ratio. "score" is the mean F1 of the three splits, as LLaVA-1.5 and
MobileVLM report POPE. eval_pope.py pairs replies with labels by position; here by question id (the
same for a complete file in question order); a question without a reply counts as wrong (the
opposite of its label: a false negative or a false positive).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from alignkd.errors import DataError

from alignkd.data.templates import short_answer

from .. import scoring
from .base import (Benchmark, EvalItem, Layout, LoadStats, check_limit, locate, missing_fields, prediction,
                   read_jsonl)

# llava_pope_test.jsonl's order and question-id offsets
SPLIT_OFFSETS = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
_OPPOSITE = {"yes": "no", "no": "yes"}
FORMAT = 'JSON lines {"question_id", "image", "text", "label": "yes"|"no"}'
LAYOUTS = (
    Layout("the release (POPE's output/coco)", "coco_pope_adversarial.json",
           "coco_pope_{adversarial,random,popular}.json + val2014/{image}"),
    Layout("LLaVA-1.5's / MobileVLM's pope/", "coco/coco_pope_adversarial.json",
           "coco/coco_pope_{adversarial,random,popular}.json + val2014/{image}"),
)


class POPE(Benchmark):
    name = "pope"
    rule = ("LLaVA eval_pope.py per split (first sentence; 'No'/'not'/'no' among its words → no); "
            "score = mean F1 of adversarial, random and popular, as LLaVA-1.5 / MobileVLM report it")

    def load(self, data_root: Path | None, limit: int | None = None) -> tuple[list[EvalItem], LoadStats]:
        check_limit(limit)
        folder, layout = locate(self.name, data_root, ("pope",), LAYOUTS)
        annotations = (folder / layout.marker).parent
        paths = {s: annotations / f"coco_pope_{s}.json" for s in SPLIT_OFFSETS}
        for p in paths.values():
            if not p.is_file():
                raise DataError(f"pope: expected {p} ({FORMAT}, images in {folder / 'val2014'}/); not found")
        stats = LoadStats(source=f"{layout.name}: {annotations}")
        items = []
        for split, offset in SPLIT_OFFSETS.items():
            n_split = 0
            seen: set[int] = set()
            for lineno, r in read_jsonl(paths[split], self.name):
                where = f"{paths[split].name}:{lineno}"
                qid = r.get("question_id") if isinstance(r, dict) else None
                known = isinstance(qid, int) and not isinstance(qid, bool)
                if limit is not None and n_split >= limit:
                    stats.skip(str(offset + qid) if known else None)
                    continue
                stats.n_rows += 1
                if isinstance(r, str):
                    stats.add_malformed(where, r)
                    continue
                if not known:
                    stats.add_malformed(where, f"question_id {qid!r} is not an integer")
                    continue
                if reason := missing_fields(r, ("image", "text")):
                    stats.add_malformed(where, reason)
                    continue
                if r.get("label") not in ("yes", "no"):
                    stats.add_malformed(where, f"label {r.get('label')!r} is not 'yes' or 'no'")
                    continue
                if qid in seen:
                    stats.add_malformed(where, f"duplicate question_id {qid}")
                    continue
                img = folder / "val2014" / r["image"]
                if not img.is_file():
                    stats.add_malformed(where, f"image {img} not found")
                    continue
                seen.add(qid)
                n_split += 1
                items.append(EvalItem(str(offset + qid), str(img), short_answer(r["text"]),
                                      {"split": split, "label": r["label"]}, question_id=offset + qid))
        return items, stats

    def score(self, items: list[EvalItem], predictions: Mapping[str, str]) -> dict[str, float]:
        by_split: dict[str, tuple[list[str], list[str]]] = {}
        missing = 0
        for it in items:
            p, miss = prediction(predictions, it)
            missing += miss
            label = it.meta["label"]
            preds, labels = by_split.setdefault(it.meta["split"], ([], []))
            preds.append(_OPPOSITE[label] if miss else scoring.parse_pope_answer(p))
            labels.append(label)
        out: dict[str, float] = {}
        per = {split: scoring.pope_metrics(*by_split[split]) for split in SPLIT_OFFSETS if split in by_split}
        for split, m in per.items():
            out.update({f"{split}_{k}": v for k, v in m.items()})
        for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            out[k] = sum(m[k] for m in per.values()) / len(per) if per else 0.0
        out.update(score=out["f1"], n=float(len(items)), n_missing=float(missing))
        return out
