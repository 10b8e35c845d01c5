"""Benchmark readers for `alignkd-mobile eval`: local files in each benchmark's public format in,
`EvalItem`s (image + question text) out, and the benchmark's own scoring of the model's replies.

Prompts follow MobileVLM's evaluation, which is LLaVA-1.5's: the question file's text plus the
short-answer or letter instruction. `EvalItem.question` is the user turn *without* the image token
and without the chat template; the caller wraps it in the `v1` template with `<image>\\n` in front.

Every rate is in percent; MME is in its own points (perception out of 2000). The headline metric of
every benchmark is under the key "score".

Expected files (relative to the `data_root` given to `load`):

=========  =========================================================================================
easyvqa    nothing: the test split that ships in the `easy-vqa` package (data_root is ignored)
gqa        testdev_balanced_questions.json  ({qid: {"imageId", "question", "answer", ...}})
           images/{imageId}.jpg
sqa        problems.json  ({pid: {"question", "choices", "answer", "hint", "image", ...}})
           pid_splits.json  ({"test": [pid, ...], ...});  images/test/{pid}/image.png
textvqa    TextVQA_0.5.1_val.json  ({"data": [{"question_id", "question", "image_id", "answers"}]})
           train_images/{image_id}.jpg;  optional TextVQA_Rosetta_OCR_v0.2_val.json (OCR tokens)
pope       coco_pope_{random,popular,adversarial}.json  (JSON lines {"question_id", "image",
           "text", "label"});  val2014/{image}
mme        {subtask}/images/*.jpg|png + {subtask}/questions_answer_YN/*.txt, or both in {subtask}/;
           each txt line "question<TAB>Yes|No"; perception subtasks only
mmbench    mmbench_dev_20230712.tsv  (columns index, question, hint, A, B, C, D, answer, category,
           image = base64)
=========  =========================================================================================

`load(data_root, limit=None)`: `limit` keeps a deterministic part for smoke runs: the first N
questions in file order (per split for POPE; the first N images for MME; the first N questions,
each with all its rotations, for MMBench), a seeded random subset of N for easy-vqa.

A missing file raises `DataError` naming the expected path and format. A row that cannot be used
(missing field, bad label, missing image ...) is not an item: it is counted in `LoadStats` with the
first few reasons, so the caller can report it.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
import random
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from alignkd.errors import ConfigError, DataError
from alignkd.eval import scoring

from alignkd.data.templates import SHORT_ANSWER_PROMPT  # noqa: E402  the one the training data uses too
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass
class EvalItem:
    id: str  # unique within the benchmark
    image: str | bytes  # path to an image file, or the raw encoded bytes (MMBench)
    question: str  # user turn without <image> and without the chat template
    meta: dict = field(default_factory=dict)  # what the scorer needs


@dataclass
class LoadStats:
    """What `load` read: rows seen, rows unusable (with the first few reasons), rows skipped on
    purpose (e.g. ScienceQA questions without an image, or rows beyond `limit`)."""

    n_rows: int = 0
    n_malformed: int = 0
    malformed: list[str] = field(default_factory=list)  # "where: reason", the first MAX_EXAMPLES
    n_skipped: int = 0
    notes: list[str] = field(default_factory=list)

    MAX_EXAMPLES = 5

    def add_malformed(self, where: str, reason: str) -> None:
        self.n_malformed += 1
        if len(self.malformed) < self.MAX_EXAMPLES:
            self.malformed.append(f"{where}: {reason}")

    def summary(self, name: str = "") -> str:
        head = f"{name}: " if name else ""
        s = f"{head}{self.n_rows} rows, {self.n_malformed} malformed"
        if self.n_skipped:
            s += f", {self.n_skipped} skipped"
        if self.malformed:
            s += " (e.g. " + "; ".join(self.malformed) + ")"
        return s


@runtime_checkable
class Benchmark(Protocol):
    name: str

    def load(self, data_root: Path, limit: int | None = None) -> tuple[list[EvalItem], LoadStats]: ...

    def score(self, items: list[EvalItem], predictions: dict[str, str]) -> dict[str, float]: ...


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _require(path: Path, bench: str, fmt: str) -> Path:
    if not path.exists():
        raise DataError(f"{bench}: expected {path} ({fmt}); not found")
    return path


def _read_json(path: Path, bench: str, fmt: str) -> Any:
    _require(path, bench, fmt)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{bench}: cannot read {path} as {fmt}: {e}") from e


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be a non-negative integer or None, got {limit!r}")


def _pred(predictions: dict[str, str], item: EvalItem) -> tuple[str, bool]:
    """The prediction of an item ('' when missing) and whether it was missing."""
    p = predictions.get(item.id)
    if p is None:
        return "", True
    return str(p), False


def _short(q: str) -> str:
    return f"{q}\n{SHORT_ANSWER_PROMPT}"


def _is_str(x: Any) -> bool:
    return isinstance(x, str) and x.strip() != ""


# --------------------------------------------------------------------------------------------------
# easy-vqa
# --------------------------------------------------------------------------------------------------

EASYVQA_ANSWERS = (
    "circle", "rectangle", "triangle",
    "red", "green", "blue", "black", "gray", "teal", "brown", "yellow",
    "yes", "no",
)


class EasyVQA:
    """Held-out split of the `easy-vqa` package (1,000 test images, ~9.7k questions, 13 answers).

    `easy_vqa.get_test_questions()` -> (questions, answers, image_ids) and
    `easy_vqa.get_test_image_paths()` -> {image_id: png path}. data_root is ignored. `limit` picks a
    deterministic random subset (seeded `random.Random(seed)`, kept in file order). Scored by exact
    match after lower-case / strip / punctuation removal.
    """

    name = "easyvqa"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def load(self, data_root: Path | None = None, limit: int | None = None):
        _check_limit(limit)
        try:
            import easy_vqa  # noqa: PLC0415
        except ImportError as e:
            raise DataError(
                "easyvqa: the `easy-vqa` package (easy_vqa.get_test_questions / "
                "get_test_image_paths) is not installed"
            ) from e
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
        stats = LoadStats(n_rows=len(questions))
        idx = list(range(len(questions)))
        if limit is not None and limit < len(idx):
            idx = sorted(random.Random(self.seed).sample(idx, limit))
            stats.n_skipped = len(questions) - limit
        items = []
        for i in idx:
            q, a, img = questions[i], answers[i], image_ids[i]
            path = paths.get(img)
            if not _is_str(q) or not _is_str(a):
                stats.add_malformed(f"test question {i}", "empty question or answer")
                continue
            if path is None or not Path(path).is_file():
                stats.add_malformed(f"test question {i}", f"image {img} not found ({path})")
                continue
            items.append(EvalItem(str(i), str(path), _short(q), {"answer": a}))
        return items, stats

    def score(self, items, predictions):
        right = valid = missing = 0
        for it in items:
            p, miss = _pred(predictions, it)
            missing += miss
            p = scoring.normalize_short_answer(p)
            right += p == scoring.normalize_short_answer(it.meta["answer"])
            valid += p in EASYVQA_ANSWERS
        n = len(items)
        return {
            "score": scoring.percent(right, n),
            "accuracy": scoring.percent(right, n),
            "valid_answer_rate": scoring.percent(valid, n),
            "n": float(n),
            "n_missing": float(missing),
        }


# --------------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------------


class GQA:
    """GQA testdev-balanced (12,578 questions), as LLaVA-1.5 / MobileVLM evaluate it.

    Files: `testdev_balanced_questions.json` ({qid: {"imageId", "question", "answer", "types", ...}})
    and `images/{imageId}.jpg`. Prompt: question + "\\nAnswer the question using a single word or
    phrase." Score: exact match after LLaVA's convert_gqa_for_eval normalisation (strip, rstrip('.'),
    lower) against the gold answer — GQA's eval.py accuracy. Also accuracy per structural type.
    """

    name = "gqa"
    QUESTIONS = "testdev_balanced_questions.json"
    FORMAT = '{qid: {"imageId", "question", "answer", ...}} JSON'

    def load(self, data_root: Path, limit: int | None = None):
        _check_limit(limit)
        root = Path(data_root)
        path = root / self.QUESTIONS
        data = _read_json(path, self.name, self.FORMAT + f" with images in {root / 'images'}/{{imageId}}.jpg")
        if not isinstance(data, dict):
            raise DataError(f"gqa: {path} must hold a JSON object {self.FORMAT}")
        stats = LoadStats()
        items = []
        for qid, q in data.items():
            if limit is not None and len(items) >= limit:
                stats.n_skipped += 1
                continue
            stats.n_rows += 1
            where = f"{path.name}[{qid}]"
            if not isinstance(q, dict):
                stats.add_malformed(where, "entry is not an object")
                continue
            missing = [k for k in ("imageId", "question", "answer") if not _is_str(q.get(k))]
            if missing:
                stats.add_malformed(where, f"missing or empty {', '.join(missing)}")
                continue
            img = root / "images" / f"{q['imageId']}.jpg"
            if not img.is_file():
                stats.add_malformed(where, f"image {img} not found")
                continue
            types = q.get("types") if isinstance(q.get("types"), dict) else {}
            items.append(
                EvalItem(
                    str(qid),
                    str(img),
                    _short(q["question"]),
                    {"answer": q["answer"], "structural": types.get("structural")},
                )
            )
        return items, stats

    def score(self, items, predictions):
        right = missing = 0
        per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for it in items:
            p, miss = _pred(predictions, it)
            missing += miss
            ok = scoring.normalize_gqa_answer(p) == it.meta["answer"]
            right += ok
            if it.meta.get("structural"):
                per_type[it.meta["structural"]][0] += ok
                per_type[it.meta["structural"]][1] += 1
        n = len(items)
        out = {"score": scoring.percent(right, n), "accuracy": scoring.percent(right, n)}
        for t, (r, c) in sorted(per_type.items()):
            out[f"accuracy_{t}"] = scoring.percent(r, c)
        out.update(n=float(n), n_missing=float(missing))
        return out


# --------------------------------------------------------------------------------------------------
# ScienceQA-IMG
# --------------------------------------------------------------------------------------------------


def sqa_prompt(problem: dict) -> str:
    """LLaVA-1.5's ScienceQA question (llava_test_CQM-A.json + --single-pred-prompt):
    "Context: {hint}\\n" (only when the hint is not empty), the question, one "A. choice" line per
    choice, then "Answer with the option's letter from the given choices directly."."""
    parts = []
    hint = (problem.get("hint") or "").strip()
    if hint:
        parts.append(f"Context: {hint}")
    parts.append(problem["question"])
    for i, c in enumerate(problem["choices"]):
        parts.append(f"{scoring.SQA_OPTIONS[i]}. {c}")
    parts.append(LETTER_PROMPT)
    return "\n".join(parts)


class ScienceQA:
    """ScienceQA test split, questions with an image only (SQA-I, 2,017 of 4,241).

    Files: `problems.json` ({pid: {"question", "choices": [...], "answer": int, "hint", "image":
    "image.png" | null, ...}}), `pid_splits.json` ({"test": [pid, ...]}) and
    `images/test/{pid}/image.png`. Prompt: see `sqa_prompt`. Score: LLaVA's eval_science_qa letter
    parsing (`scoring.parse_sqa_letter`), right when the letter's index is the answer index.
    """

    name = "sqa"
    SPLIT = "test"

    def load(self, data_root: Path, limit: int | None = None):
        _check_limit(limit)
        root = Path(data_root)
        problems = _read_json(
            root / "problems.json", self.name,
            '{pid: {"question", "choices", "answer", "hint", "image", ...}} JSON',
        )
        splits = _read_json(root / "pid_splits.json", self.name, '{"test": [pid, ...], ...} JSON')
        if not isinstance(problems, dict):
            raise DataError(f"sqa: {root / 'problems.json'} must hold a JSON object {{pid: problem}}")
        if not isinstance(splits, dict) or not isinstance(splits.get(self.SPLIT), list):
            raise DataError(f"sqa: {root / 'pid_splits.json'} has no list under \"{self.SPLIT}\"")
        stats = LoadStats()
        items = []
        for pid in splits[self.SPLIT]:
            pid = str(pid)
            prob = problems.get(pid)
            if isinstance(prob, dict) and not prob.get("image"):
                stats.n_skipped += 1  # text-only question: not part of SQA-I
                continue
            if limit is not None and len(items) >= limit:
                stats.n_skipped += 1
                continue
            stats.n_rows += 1
            where = f"problems.json[{pid}]"
            if not isinstance(prob, dict):
                stats.add_malformed(where, "listed in pid_splits.json but missing from problems.json")
                continue
            choices, answer = prob.get("choices"), prob.get("answer")
            if not _is_str(prob.get("question")):
                stats.add_malformed(where, "missing question")
                continue
            if (
                not isinstance(choices, list)
                or not 2 <= len(choices) <= len(scoring.SQA_OPTIONS)
                or not all(isinstance(c, str) for c in choices)
            ):
                stats.add_malformed(where, f"choices must be 2..{len(scoring.SQA_OPTIONS)} strings")
                continue
            if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                stats.add_malformed(where, f"answer {answer!r} is not an index into the choices")
                continue
            img = root / "images" / self.SPLIT / pid / str(prob["image"])
            if not img.is_file():
                stats.add_malformed(where, f"image {img} not found")
                continue
            items.append(
                EvalItem(pid, str(img), sqa_prompt(prob), {"answer": answer, "n_choices": len(choices)})
            )
        if stats.n_skipped:
            stats.notes.append(f"{stats.n_skipped} test questions skipped (no image, or beyond limit)")
        return items, stats

    def score(self, items, predictions):
        right = failed = missing = 0
        for it in items:
            p, miss = _pred(predictions, it)
            missing += miss
            letter = scoring.parse_sqa_letter(p)
            idx = scoring.sqa_pred_index(letter, it.meta["n_choices"])
            failed += idx == -1
            right += idx == it.meta["answer"]
        n = len(items)
        return {
            "score": scoring.percent(right, n),
            "accuracy": scoring.percent(right, n),
            "unparsed_rate": scoring.percent(failed, n),
            "n": float(n),
            "n_missing": float(missing),
        }


# --------------------------------------------------------------------------------------------------
# TextVQA
# --------------------------------------------------------------------------------------------------


class TextVQA:
    """TextVQA 0.5.1 validation (5,000 questions), VQA soft accuracy.

    Files: `TextVQA_0.5.1_val.json` ({"data": [{"question_id", "question", "image_id", "answers":
    [10 strings], ...}]}), `train_images/{image_id}.jpg` (val images live in the train folder), and
    optionally `TextVQA_Rosetta_OCR_v0.2_val.json` ({"data": [{"image_id", "ocr_tokens": [...]}]}).
    Prompt: as LLaVA-1.5's llava_textvqa_val_v051_ocr.jsonl: question, then
    "Reference OCR token: t1, t2, ..." when OCR tokens are known for the image (from the Rosetta file
    or an "ocr_tokens" field of the question; `use_ocr=False` leaves them out), then the
    short-answer instruction. Score: EvalAI-normalised answers, min(#matches/3, 1) averaged over the
    10 leave-one-annotator-out subsets (`scoring.vqa_accuracy`).
    """

    name = "textvqa"
    QUESTIONS = "TextVQA_0.5.1_val.json"
    OCR = "TextVQA_Rosetta_OCR_v0.2_val.json"
    FORMAT = '{"data": [{"question_id", "question", "image_id", "answers": [10 strings]}]} JSON'

    def __init__(self, use_ocr: bool = True):
        self.use_ocr = use_ocr

    def load(self, data_root: Path, limit: int | None = None):
        _check_limit(limit)
        root = Path(data_root)
        path = root / self.QUESTIONS
        data = _read_json(path, self.name, self.FORMAT + f" with images in {root / 'train_images'}/{{image_id}}.jpg")
        rows = data.get("data") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise DataError(f"textvqa: {path} must hold {self.FORMAT}")
        ocr: dict[str, list[str]] = {}
        stats = LoadStats()
        if self.use_ocr and (root / self.OCR).exists():
            o = _read_json(root / self.OCR, self.name, '{"data": [{"image_id", "ocr_tokens"}]} JSON')
            for r in o.get("data", []) if isinstance(o, dict) else []:
                if isinstance(r, dict) and isinstance(r.get("ocr_tokens"), list):
                    ocr[str(r.get("image_id"))] = [str(t) for t in r["ocr_tokens"]]
            stats.notes.append(f"OCR tokens from {self.OCR} for {len(ocr)} images")
        items = []
        seen: set[str] = set()
        for i, r in enumerate(rows):
            if limit is not None and len(items) >= limit:
                stats.n_skipped += 1
                continue
            stats.n_rows += 1
            where = f"{path.name} data[{i}]"
            if not isinstance(r, dict):
                stats.add_malformed(where, "entry is not an object")
                continue
            qid, q, img_id, answers = r.get("question_id"), r.get("question"), r.get("image_id"), r.get("answers")
            if qid is None or not _is_str(q) or not _is_str(img_id):
                stats.add_malformed(where, "missing question_id, question or image_id")
                continue
            if not isinstance(answers, list) or len(answers) != 10 or not all(isinstance(a, str) for a in answers):
                stats.add_malformed(where, "answers must be a list of 10 strings")
                continue
            if str(qid) in seen:
                stats.add_malformed(where, f"duplicate question_id {qid}")
                continue
            img = root / "train_images" / f"{img_id}.jpg"
            if not img.is_file():
                stats.add_malformed(where, f"image {img} not found")
                continue
            seen.add(str(qid))
            tokens = ocr.get(str(img_id))
            if tokens is None and self.use_ocr and isinstance(r.get("ocr_tokens"), list):
                tokens = [str(t) for t in r["ocr_tokens"]]
            text = q
            if tokens:
                text += "\nReference OCR token: " + ", ".join(tokens)
            items.append(EvalItem(str(qid), str(img), _short(text), {"answers": list(answers)}))
        return items, stats

    def score(self, items, predictions):
        total = 0.0
        missing = 0
        for it in items:
            p, miss = _pred(predictions, it)
            missing += miss
            total += scoring.vqa_accuracy(p, it.meta["answers"])
        n = len(items)
        return {
            "score": scoring.percent(total, n),
            "accuracy": scoring.percent(total, n),
            "n": float(n),
            "n_missing": float(missing),
        }


# --------------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------------


class POPE:
    """POPE on COCO val2014: 3 splits x 3,000 yes/no questions.

    Files: `coco_pope_{random,popular,adversarial}.json`, JSON lines {"question_id", "image", "text",
    "label": "yes"|"no"}, and `val2014/{image}`. Prompt: text + short-answer instruction. Replies are
    read as LLaVA's eval_pope.py does (`scoring.parse_pope_answer`). Metrics per split
    ("{split}_accuracy", "_precision", "_recall", "_f1", "_yes_ratio") and their means over the
    splits; "score" is the mean F1.
    """

    name = "pope"
    SPLITS = ("random", "popular", "adversarial")
    FORMAT = 'JSON lines {"question_id", "image", "text", "label": "yes"|"no"}'

    def __init__(self, splits: tuple[str, ...] = SPLITS):
        self.splits = tuple(splits)

    def load(self, data_root: Path, limit: int | None = None):
        _check_limit(limit)
        root = Path(data_root)
        for split in self.splits:
            _require(root / f"coco_pope_{split}.json", self.name, self.FORMAT + f", images in {root / 'val2014'}/")
        stats = LoadStats()
        items = []
        for split in self.splits:
            path = root / f"coco_pope_{split}.json"
            n_split = 0
            seen: set[str] = set()
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if limit is not None and n_split >= limit:
                        stats.n_skipped += 1
                        continue
                    stats.n_rows += 1
                    where = f"{path.name}:{lineno}"
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError as e:
                        stats.add_malformed(where, f"not JSON ({e.msg})")
                        continue
                    if not isinstance(r, dict):
                        stats.add_malformed(where, "line is not a JSON object")
                        continue
                    qid, img, text, label = r.get("question_id"), r.get("image"), r.get("text"), r.get("label")
                    if qid is None or not _is_str(img) or not _is_str(text):
                        stats.add_malformed(where, "missing question_id, image or text")
                        continue
                    if label not in ("yes", "no"):
                        stats.add_malformed(where, f"label {label!r} is not 'yes' or 'no'")
                        continue
                    iid = f"{split}/{qid}"
                    if iid in seen:
                        stats.add_malformed(where, f"duplicate question_id {qid}")
                        continue
                    ipath = root / "val2014" / img
                    if not ipath.is_file():
                        stats.add_malformed(where, f"image {ipath} not found")
                        continue
                    seen.add(iid)
                    n_split += 1
                    items.append(EvalItem(iid, str(ipath), _short(text), {"split": split, "label": label}))
        return items, stats

    def score(self, items, predictions):
        by_split: dict[str, tuple[list[str], list[str]]] = {}
        missing = 0
        for it in items:
            p, miss = _pred(predictions, it)
            missing += miss
            preds, labels = by_split.setdefault(it.meta["split"], ([], []))
            preds.append(scoring.parse_pope_answer(p))
            labels.append(it.meta["label"])
        out: dict[str, float] = {}
        per = {}
        for split in [s for s in self.splits if s in by_split] + [s for s in by_split if s not in self.splits]:
            m = scoring.pope_metrics(*by_split[split])
            per[split] = m
            for k, v in m.items():
                out[f"{split}_{k}"] = v
        for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            out[k] = sum(m[k] for m in per.values()) / len(per) if per else 0.0
        out["score"] = out["f1"]
        out["n"] = float(len(items))
        out["n_missing"] = float(missing)
        return out


# --------------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


class MME:
    """MME perception (MME-P): 10 subtasks, 2 yes/no questions per image.

    Layout of MME_Benchmark_release_version: either `{subtask}/images/NAME.jpg|png` with
    `{subtask}/questions_answer_YN/NAME.txt`, or NAME.jpg|png and NAME.txt side by side in
    `{subtask}/`. Each txt line: "question<TAB>Yes|No". Prompt: the question (which already ends in
    "Please answer yes or no.") + short-answer instruction, as LLaVA-1.5's llava_mme.jsonl.
    Score: MME's calculation.py: per subtask acc (questions) + acc+ (images with both right), each in
    percent, so a subtask is out of 200; "perception" (= "score") is the sum over the 10 subtasks.
    """

    name = "mme"

    def __init__(self, subtasks: tuple[str, ...] = MME_PERCEPTION):
        self.subtasks = tuple(subtasks)

    def _layout(self, root: Path) -> str:
        return (
            f"{root}/{{subtask}}/images/*.jpg|png + {root}/{{subtask}}/questions_answer_YN/*.txt, or "
            f"images and txt together in {root}/{{subtask}}/; txt lines 'question<TAB>Yes|No'"
        )

    def load(self, data_root: Path, limit: int | None = None):
        _check_limit(limit)
        root = Path(data_root)
        missing = [s for s in self.subtasks if not (root / s).is_dir()]
        if missing:
            raise DataError(
                f"mme: expected subtask folder(s) {', '.join(str(root / s) for s in missing)} "
                f"({self._layout(root)})"
            )
        stats = LoadStats()
        items = []
        n_images = 0
        for sub in self.subtasks:
            sdir = root / sub
            if (sdir / "questions_answer_YN").is_dir():
                qdir, idir = sdir / "questions_answer_YN", sdir / "images"
            else:
                qdir, idir = sdir, sdir
            txts = sorted(qdir.glob("*.txt"))
            if not txts:
                raise DataError(f"mme: no question files (*.txt) in {qdir} ({self._layout(root)})")
            for txt in txts:
                img = next((idir / (txt.stem + e) for e in _IMAGE_EXTS if (idir / (txt.stem + e)).is_file()), None)
                try:
                    lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                except (OSError, UnicodeDecodeError) as e:
                    stats.n_rows += 1
                    stats.add_malformed(f"{sub}/{txt.name}", f"unreadable ({e})")
                    continue
                if limit is not None and n_images >= limit:
                    stats.n_skipped += len(lines)
                    continue
                stats.n_rows += len(lines)
                where = f"{sub}/{txt.name}"
                if img is None:
                    for _ in lines:
                        stats.add_malformed(where, f"no image {txt.stem}.jpg|png in {idir}")
                    continue
                good = []
                for k, ln in enumerate(lines):
                    parts = ln.rstrip("\r\n").split("\t")
                    if len(parts) != 2:
                        stats.add_malformed(f"{where}:{k + 1}", "line is not 'question<TAB>answer'")
                        continue
                    q, a = parts[0].strip(), parts[1].strip().lower()
                    if not q or a not in ("yes", "no"):
                        stats.add_malformed(f"{where}:{k + 1}", f"answer {parts[1].strip()!r} is not Yes/No")
                        continue
                    good.append((k, q, a))
                if not good:
                    continue
                n_images += 1
                key = f"{sub}/{img.name}"
                for k, q, a in good:
                    items.append(
                        EvalItem(f"{key}#{k}", str(img), _short(q), {"subtask": sub, "image_key": key, "answer": a})
                    )
        return items, stats

    def score(self, items, predictions):
        per_sub: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
        missing = 0
        for it in items:
            p, miss = _pred(predictions, it)
            missing += miss
            per_sub[it.meta["subtask"]][it.meta["image_key"]].append((it.meta["answer"], p))
        out: dict[str, float] = {}
        total = 0.0
        n_other = 0.0
        for sub in [s for s in self.subtasks if s in per_sub] + sorted(s for s in per_sub if s not in self.subtasks):
            m = scoring.mme_subtask_metrics(per_sub[sub].values())
            out[f"{sub}_acc"] = m["acc"]
            out[f"{sub}_acc_plus"] = m["acc_plus"]
            out[f"{sub}_score"] = m["score"]
            n_other += m["n_other"]
            if sub in MME_PERCEPTION:
                total += m["score"]
        missing_subs = [s for s in MME_PERCEPTION if s in self.subtasks and s not in per_sub]
        out["perception"] = total
        out["score"] = total
        out["n_subtasks"] = float(len([s for s in per_sub if s in MME_PERCEPTION]))
        out["n_unparsed"] = n_other
        out["n"] = float(len(items))
        out["n_missing"] = float(missing)
        if missing_subs:
            out["n_subtasks_without_items"] = float(len(missing_subs))
        return out


# --------------------------------------------------------------------------------------------------
# MMBench
# --------------------------------------------------------------------------------------------------

_MMB_LETTERS = ("A", "B", "C", "D")
_CIRCULAR_OFFSET = 1_000_000


def _is_none(v: Any) -> bool:
    """LLaVA model_vqa_mmbench.is_none: None, NaN, '' or the strings 'nan' / 'none'."""
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and v.strip().lower() in ("", "nan", "none"):
        return True
    return False


def mmbench_prompt(question: str, hint: str | None, options: list[str]) -> str:
    """LLaVA's model_vqa_mmbench: hint + "\\n" (when present) + question, one "A. option" line per
    option, then "Answer with the option's letter from the given choices directly."."""
    q = question if _is_none(hint) else f"{hint}\n{question}"
    for letter, opt in zip(_MMB_LETTERS, options):
        q += f"\n{letter}. {opt}"
    return f"{q}\n{LETTER_PROMPT}"


class MMBench:
    """MMBench dev (English) with circular evaluation.

    File: `mmbench_dev_20230712.tsv` (tab-separated, header row; columns index, question, hint, A, B,
    C, D, answer, category, image = base64 image, ...; empty options are 'nan' / empty).

    Circular evaluation: a question is asked once per rotation of its N options (rotation r shows
    original options r, r+1, ... as A, B, ...), and counts right only if every rotation is right.
    If the TSV already holds the rotated copies (rows with index >= 1,000,000, as the official files
    of later releases do, copy index = k * 1e6 + original index), its rows are used as they are and
    grouped by index mod 1e6; otherwise the rotations are generated here (LLaVA's --all-rounds).
    Each item carries its rotation: meta["letter_map"] maps a shown letter to the original one.
    A reply's letter is read by `scoring.parse_choice_letter`. "score" is the circular accuracy;
    "vanilla_accuracy" counts rotation 0 only; "cat/<category>" is the circular accuracy per
    category.
    """

    name = "mmbench"
    TSV = "mmbench_dev_20230712.tsv"
    FORMAT = "tab-separated with header index, question, hint, A, B, C, D, answer, category, image (base64)"

    def __init__(self, tsv_name: str = TSV, circular: bool = True):
        self.tsv_name = tsv_name
        self.circular = circular

    def load(self, data_root: Path, limit: int | None = None):
        _check_limit(limit)
        root = Path(data_root)
        path = _require(root / self.tsv_name, self.name, self.FORMAT)
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        stats = LoadStats()
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            cols = reader.fieldnames or []
            need = [c for c in ("index", "question", "A", "B", "answer", "image") if c not in cols]
            if need:
                raise DataError(f"mmbench: {path} lacks column(s) {', '.join(need)} (expected {self.FORMAT})")
            rows = list(reader)

        # First pass: parse rows, keep their image text (an image may be a reference to another row).
        parsed = []
        images_by_index: dict[int, str] = {}
        for lineno, r in enumerate(rows, 2):
            where = f"{path.name}:{lineno}"
            try:
                index = int(float(r["index"]))
            except (TypeError, ValueError):
                stats.n_rows += 1
                stats.add_malformed(where, f"index {r.get('index')!r} is not an integer")
                continue
            parsed.append((where, index, r))
            if not _is_none(r.get("image")) and len(r["image"]) > 64:
                images_by_index[index] = r["image"]
        has_copies = any(index >= _CIRCULAR_OFFSET for _, index, _ in parsed)

        decoded: dict[int, bytes] = {}
        items: list[EvalItem] = []
        groups_seen: set[int] = set()
        ids_seen: set[str] = set()
        for where, index, r in parsed:
            group = index % _CIRCULAR_OFFSET
            if limit is not None and group not in groups_seen and len(groups_seen) >= limit:
                stats.n_skipped += 1
                continue
            if has_copies and not self.circular and index >= _CIRCULAR_OFFSET:
                stats.n_skipped += 1
                continue
            stats.n_rows += 1
            options = []
            for letter in _MMB_LETTERS:
                v = r.get(letter)
                if _is_none(v):
                    break
                options.append(v)
            answer = (r.get("answer") or "").strip()
            if _is_none(r.get("question")):
                stats.add_malformed(where, "empty question")
                continue
            if len(options) < 2:
                stats.add_malformed(where, "fewer than 2 options")
                continue
            if answer not in _MMB_LETTERS[: len(options)]:
                stats.add_malformed(where, f"answer {answer!r} is not one of {_MMB_LETTERS[: len(options)]}")
                continue
            img = self._image(r.get("image"), images_by_index, decoded)
            if isinstance(img, str):
                stats.add_malformed(where, img)
                continue
            hint = None if _is_none(r.get("hint")) else r["hint"]
            meta_base = {
                "group": group,
                "answer": answer,
                "category": r.get("category") or "",
                "l2_category": r.get("l2-category") or "",
            }
            if has_copies or not self.circular:
                rots = [(index // _CIRCULAR_OFFSET, options, {k: k for k in _MMB_LETTERS[: len(options)]})]
            else:
                rots = []
                for rot in range(len(options)):
                    shown = options[rot:] + options[:rot]
                    orig = list(_MMB_LETTERS[: len(options)])
                    orig = orig[rot:] + orig[:rot]
                    rots.append((rot, shown, dict(zip(_MMB_LETTERS, orig))))
            for rot, shown, letter_map in rots:
                iid = f"{group}:{rot}"
                if iid in ids_seen:
                    stats.add_malformed(where, f"duplicate index {index}")
                    break
                ids_seen.add(iid)
                meta = dict(meta_base, rotation=rot, letter_map=letter_map, options=dict(zip(_MMB_LETTERS, shown)))
                items.append(EvalItem(iid, img, mmbench_prompt(r["question"], hint, shown), meta))
            groups_seen.add(group)
        if has_copies:
            stats.notes.append("the TSV holds the circular copies (index >= 1e6): rows used as they are")
        return items, stats

    @staticmethod
    def _image(text: str | None, by_index: dict[int, str], cache: dict[int, bytes]) -> bytes | str:
        """Decoded image bytes, or a reason (str) why not."""
        if _is_none(text):
            return "empty image"
        text = text.strip()
        if len(text) <= 64 and text.isdigit():  # a reference to another row's image
            ref = int(text)
            if ref in cache:
                return cache[ref]
            if ref not in by_index:
                return f"image refers to row index {ref}, which has no image"
            text = by_index[ref]
        else:
            ref = None
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return "image is not valid base64"
        try:
            from PIL import Image  # noqa: PLC0415

            with Image.open(io.BytesIO(data)) as im:
                im.size  # noqa: B018 - header parsed
        except Exception as e:  # noqa: BLE001 - any decoder error means an unusable image
            return f"image bytes are not a readable image ({type(e).__name__})"
        if ref is not None:
            cache[ref] = data
        return data

    def score(self, items, predictions):
        groups: dict[int, list[bool]] = defaultdict(list)
        vanilla: dict[int, bool] = {}
        cats: dict[int, str] = {}
        unparsed = missing = 0
        for it in items:
            p, miss = _pred(predictions, it)
            missing += miss
            letter = scoring.parse_choice_letter(p, it.meta["options"])
            unparsed += letter is None
            ok = letter is not None and it.meta["letter_map"].get(letter) == it.meta["answer"]
            g = it.meta["group"]
            groups[g].append(ok)
            cats[g] = it.meta.get("category", "")
            if it.meta["rotation"] == 0:
                vanilla[g] = ok
        n = len(groups)
        circ = {g: all(v) for g, v in groups.items()}
        out = {
            "score": scoring.percent(sum(circ.values()), n),
            "circular_accuracy": scoring.percent(sum(circ.values()), n),
            "vanilla_accuracy": scoring.percent(sum(vanilla.values()), len(vanilla)),
        }
        per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for g, ok in circ.items():
            if cats[g]:
                per_cat[cats[g]][0] += ok
                per_cat[cats[g]][1] += 1
        for c, (r, t) in sorted(per_cat.items()):
            out[f"cat/{c}"] = scoring.percent(r, t)
        out.update(
            n_questions=float(n), n=float(len(items)), n_unparsed=float(unparsed), n_missing=float(missing)
        )
        return out


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

BENCHMARKS: dict[str, Benchmark] = {
    "easyvqa": EasyVQA(),
    "gqa": GQA(),
    "sqa": ScienceQA(),
    "textvqa": TextVQA(),
    "pope": POPE(),
    "mme": MME(),
    "mmbench": MMBench(),
}


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark `name`; ConfigError naming the known ones otherwise."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None
