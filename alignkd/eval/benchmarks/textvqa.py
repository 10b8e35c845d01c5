"""TextVQA 0.5.1 validation (5,000 questions), as LLaVA-1.5 / MobileVLM score it.

Files (`data_root` = the folder below, or a folder holding it as `textvqa/`), the same in the
release and in LLaVA-1.5's / MobileVLM's textvqa/:
  TextVQA_0.5.1_val.json  ({"data": [{"question_id", "question", "image_id", "answers": [10 strings]}]})
  train_images/{image_id}.jpg  (train_val_images.zip; the val images live in the train folder)
  llava_textvqa_val_v051_ocr.jsonl  (optional, LLaVA's eval.zip: the prompts with OCR tokens), else
  TextVQA_Rosetta_OCR_v0.2_val.json  (optional: {"data": [{"image_id", "ocr_tokens"}]})

Prompt: LLaVA's llava_textvqa_val_v051_ocr.jsonl text when that file is there; else the question,
"Reference OCR token: t1, t2, ..." from the Rosetta file, and the short-answer instruction, one per
line; with neither file, the question and the instruction (the number is then not comparable with
MobileVLM's, which saw OCR tokens: the load notes say so).
question_id: the image id, as in LLaVA's files; eval_textvqa.py finds a reply's question by
(question_id, the question line of its prompt, lower-cased), and so does `answer_keys`.
Score (LLaVA's eval_textvqa.py + m4c_evaluator.TextVQAAccuracyEvaluator): the reply and the 10 human
answers are EvalAI-normalised; score = mean over the 10 leave-one-annotator-out subsets of
min(#matches / 3, 1). eval_textvqa.py averages over the replies in the file; here over the
questions, a question without a reply scoring 0 (the same when every question has one).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alignkd.data.templates import SHORT_ANSWER_PROMPT, short_answer
from alignkd.errors import DataError

from .. import scoring
from .base import (Benchmark, EvalItem, Layout, LoadStats, check_limit, locate, mean_scores, missing_fields,
                   read_json, read_jsonl)

QUESTIONS = "TextVQA_0.5.1_val.json"
LLAVA_PROMPTS = "llava_textvqa_val_v051_ocr.jsonl"
ROSETTA_OCR = "TextVQA_Rosetta_OCR_v0.2_val.json"
FORMAT = '{"data": [{"question_id", "question", "image_id", "answers": [10 strings]}]} JSON'
LAYOUTS = (
    Layout("the release / LLaVA-1.5's and MobileVLM's textvqa/", QUESTIONS,
           f"{QUESTIONS} + train_images/{{image_id}}.jpg [+ {LLAVA_PROMPTS} or {ROSETTA_OCR}]"),
)


def prompt_question(prompt: Any) -> str | None:
    """The question eval_textvqa.py's prompt_processor reads from a prompt, lower-cased; None where
    that script would fail. A prompt starting "OCR tokens: " holds it between "Question: " and
    " Short answer:"; a 3-line prompt with "Reference OCR token: " holds it on line 1 (line 2 when
    the OCR line comes first); a 2-line prompt on line 1."""
    if not isinstance(prompt, str):
        return None
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        q = m.group(1) if m else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        q = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        q = lines[0]
    else:
        q = None
    return None if q is None else q.lower()


def _key(image_id: Any, question_lower: str) -> str:
    return json.dumps([str(image_id), question_lower])


class TextVQA(Benchmark):
    name = "textvqa"
    rule = ("LLaVA eval_textvqa.py (m4c_evaluator): EvalAI-normalised reply, VQA accuracy min(#annotators/3, 1) "
            "averaged over the 10 leave-one-out subsets")

    def __init__(self, use_ocr: bool = True):
        self.use_ocr = use_ocr

    def answer_keys(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        q = prompt_question(row.get("prompt"))
        return () if q is None else (_key(row["question_id"], q),)

    def load(self, data_root: Path | None, limit: int | None = None) -> tuple[list[EvalItem], LoadStats]:
        check_limit(limit)
        folder, layout = locate(self.name, data_root, ("textvqa",), LAYOUTS)
        path = folder / QUESTIONS
        data = read_json(path, self.name, FORMAT)
        rows = data.get("data") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise DataError(f"textvqa: {path} must hold {FORMAT}")
        stats = LoadStats(source=f"{layout.name}: {path}")
        prompts, ocr = self._prompt_sources(folder, stats)
        items = []
        seen: set[str] = set()
        for i, r in enumerate(rows):
            where = f"{path.name} data[{i}]"
            if not isinstance(r, dict) or missing_fields(r, ("question", "image_id")):
                stats.n_rows += 1
                stats.add_malformed(where, "not an object with question and image_id")
                continue
            key = _key(r["image_id"], r["question"].lower())
            if limit is not None and len(items) >= limit:
                stats.skip(key)
                continue
            stats.n_rows += 1
            answers = r.get("answers")
            if not isinstance(answers, list) or len(answers) != 10 or not all(isinstance(a, str) for a in answers):
                stats.add_malformed(where, "answers must be a list of 10 strings")
                continue
            if key in seen:
                stats.add_malformed(where, f"duplicate (image_id, question) {key}")
                continue
            img = folder / "train_images" / f"{r['image_id']}.jpg"
            if not img.is_file():
                stats.add_malformed(where, f"image {img} not found")
                continue
            tokens = None if ocr is None else ocr.get(str(r["image_id"]), [])  # LLaVA writes the line even when empty
            text = prompts.get(key) or self._prompt(r["question"], tokens)
            if prompt_question(text) != r["question"].lower():
                stats.add_malformed(where, "its question cannot be read back from the prompt as eval_textvqa.py does")
                continue
            seen.add(key)
            items.append(EvalItem(key, str(img), text, {"answers": list(answers)}, question_id=str(r["image_id"])))
        return items, stats

    def _prompt_sources(self, folder: Path, stats: LoadStats) -> tuple[dict[str, str], dict[str, list[str]] | None]:
        """LLaVA's prompts by question key, and Rosetta OCR tokens by image id (None: no OCR file)."""
        if not self.use_ocr:
            stats.notes.append("OCR tokens left out of the prompts (use_ocr=False)")
            return {}, None
        # a prompt file that is there but unreadable is an error, not a silent run without OCR tokens
        if (folder / LLAVA_PROMPTS).is_file():
            prompts, bad = {}, []
            for lineno, row in read_jsonl(folder / LLAVA_PROMPTS, self.name):
                q = prompt_question(row.get("text")) if isinstance(row, dict) else None
                if q is not None and "question_id" in row:
                    prompts[_key(row["question_id"], q)] = row["text"]
                else:
                    bad.append(f"line {lineno}: {row if isinstance(row, str) else 'no question_id and text'}")
            if not prompts:
                raise DataError(f"textvqa: {folder / LLAVA_PROMPTS} holds no prompt row (question_id, text)")
            stats.notes.append(f"prompts (with OCR tokens) from {LLAVA_PROMPTS}")
            if bad:  # their questions get our prompt, without OCR tokens
                stats.notes.append(f"{len(bad)} unusable line(s) of {LLAVA_PROMPTS} (e.g. {bad[0]}): questions "
                                   "without a prompt line are asked without OCR tokens")
            return prompts, None
        if (folder / ROSETTA_OCR).is_file():
            what = '{"data": [{"image_id", "ocr_tokens"}]} JSON'
            o = read_json(folder / ROSETTA_OCR, self.name, what)
            rows = o.get("data") if isinstance(o, dict) else None
            ocr = {str(r.get("image_id")): [str(t) for t in r["ocr_tokens"]] for r in rows or []
                   if isinstance(r, dict) and isinstance(r.get("ocr_tokens"), list)} if isinstance(rows, list) else {}
            if not ocr:
                raise DataError(f"textvqa: {folder / ROSETTA_OCR} holds no OCR entry: {what} expected")
            stats.notes.append(f"OCR tokens from {ROSETTA_OCR} for {len(ocr)} images")
            return {}, ocr
        stats.notes.append(f"no {LLAVA_PROMPTS} or {ROSETTA_OCR}: prompts without OCR tokens, "
                           "not comparable with MobileVLM's TextVQA numbers")
        return {}, None

    @staticmethod
    def _prompt(question: str, tokens: list[str] | None) -> str:
        if tokens is None:
            return short_answer(question)
        return f"{question}\nReference OCR token: {', '.join(tokens)}\n{SHORT_ANSWER_PROMPT}"

    def score(self, items: list[EvalItem], predictions: Mapping[str, str]) -> dict[str, float]:
        return mean_scores(items, predictions, lambda p, it: {"accuracy": scoring.vqa_accuracy(p, it.meta["answers"])})
