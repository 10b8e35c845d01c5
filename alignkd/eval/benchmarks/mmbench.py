"""MMBench dev (English), circular evaluation as VLMEvalKit scores it with exact matching (no judge model).

Files (`data_root` = the folder holding the TSV, e.g. LLaVA-1.5's playground/data/eval/mmbench or
MobileVLM's data/benchmark_data/mmbench, or a folder holding `mmbench/`), the first found of:
  mmbench_dev_en_20231003.tsv  (MobileVLM V2's), mmbench_dev_20230712.tsv  (LLaVA-1.5's),
  MMBench_DEV_EN.tsv, MMBench_DEV_EN_V11.tsv  (VLMEvalKit's)
Tab-separated with a header: index, question, hint, A, B, C, D, answer, category, l2-category,
image (base64, or the index of the row whose image it shares). The released dev TSVs hold every
question once per circular shift of its options: index i for the original, k·1,000,000 + i for the
k-th shift. A cell pandas reads as missing ("", "nan", "None", "N/A", ...) is no option / no hint.

Prompt (LLaVA's / MobileVLM's model_vqa_mmbench --single-pred-prompt): "{hint}\\n" when there is a
hint, the question, one "A. option" line per option up to the first missing one, then the letter
instruction. question_id: the row's index; the answer file's prompt is without the instruction and
carries round_id 0, options and option_char, as model_vqa_mmbench writes them.
Score (VLMEvalKit's mcq_circular_eval with exact matching): a reply's letter is
`scoring.can_infer(reply, {letter: option text})` (VLMEvalKit's can_infer); a question (a group of
rows with the same index mod 1,000,000, led by its original row) counts as right only if every row
of the group is right. "score" = circular accuracy over the questions; also per category and
l2-category, and the accuracy of the original rows alone ("vanilla_accuracy"). A TSV without the
shifted copies scores each question once, as VLMEvalKit does. A row without a reply is wrong.
"""

from __future__ import annotations

import base64
import binascii
import io
import string
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import scoring
from .base import LETTER_PROMPT, Benchmark, EvalItem, Layout, LoadStats, check_limit, locate, read_tsv

CIRCULAR_OFFSET = 1_000_000
PROMPT_LETTERS = ("A", "B", "C", "D")  # model_vqa_mmbench's all_options
FORMAT = "tab-separated with header index, question, hint, A, B, C, D, answer, category, image (base64)"
LAYOUTS = tuple(
    Layout(name, tsv, tsv) for name, tsv in (
        ("MobileVLM V2's MMBench dev (en, 20231003)", "mmbench_dev_en_20231003.tsv"),
        ("LLaVA-1.5's MMBench dev (20230712)", "mmbench_dev_20230712.tsv"),
        ("VLMEvalKit's MMBench_DEV_EN", "MMBench_DEV_EN.tsv"),
        ("VLMEvalKit's MMBench_DEV_EN_V11", "MMBench_DEV_EN_V11.tsv"),
    )
)
# pandas.read_table's default missing-value strings: LLaVA and VLMEvalKit read the TSV with pandas,
# so such a cell is no option or hint. LLaVA's is_none also takes "nan" / "none" in any case.
_PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})


def is_na(cell: str | None) -> bool:
    return cell is None or cell in _PANDAS_NA or cell.lower() in ("nan", "none")


def mmbench_prompt(question: str, hint: str | None, options: list[str]) -> str:
    """model_vqa_mmbench's question (its "prompt" field): hint line, question, option lines."""
    q = question if hint is None else f"{hint}\n{question}"
    return q + "".join(f"\n{letter}. {opt}" for letter, opt in zip(PROMPT_LETTERS, options))


class MMBench(Benchmark):
    name = "mmbench"
    rule = ("VLMEvalKit circular evaluation with exact matching (can_infer, no judge): a question counts only "
            "if the reply to every circular shift of its options is right")

    def __init__(self, tsv_name: str | None = None):
        self.tsv_name = tsv_name  # None: the first of LAYOUTS found

    def answer_keys(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        # LLaVA's --all-rounds shifts the options itself (round_id > 0): not the released TSVs' copies
        r = row.get("round_id") or 0
        return (str(row["question_id"]) if r == 0 else f"{row['question_id']}/round{r}",)

    def load(self, data_root: Path | None, limit: int | None = None) -> tuple[list[EvalItem], LoadStats]:
        check_limit(limit)
        layouts = [lay for lay in LAYOUTS if self.tsv_name in (None, lay.marker)] or [Layout(self.tsv_name, self.tsv_name, self.tsv_name)]
        folder, layout = locate(self.name, data_root, ("mmbench",), layouts)
        path = folder / layout.marker
        cols, rows = read_tsv(path, self.name, ("index", "question", "A", "B", "answer", "image"), FORMAT)
        letters = [c for c in string.ascii_uppercase if c in cols]  # VLMEvalKit's build_choices
        stats = LoadStats(source=f"{layout.name}: {path}")

        parsed: list[tuple[str, int, dict]] = []
        seen: set[int] = set()
        images: dict[int, str] = {}
        for lineno, r in enumerate(rows, 2):
            try:
                index = int(float(r["index"]))
            except (TypeError, ValueError, OverflowError):  # OverflowError: "inf"
                index = None
            if index is None or index in seen:
                stats.n_rows += 1
                stats.add_malformed(f"{path.name}:{lineno}", f"index {r.get('index')!r} is not a new integer")
                continue
            seen.add(index)
            parsed.append((f"{path.name}:{lineno}", index, r))
            if not is_na(r.get("image")) and len(r["image"]) > 64:
                images[index] = r["image"]
        mains = [index for _, index, _ in parsed if index < CIRCULAR_OFFSET]
        kept = set(mains if limit is None else mains[:limit])
        if not any(index >= CIRCULAR_OFFSET for _, index, _ in parsed):
            stats.notes.append("the TSV holds no circular copies: each question is asked once")

        items: list[EvalItem] = []
        bad_groups: set[int] = set()
        decoded: dict[int, bytes] = {}
        for where, index, r in parsed:
            group = index % CIRCULAR_OFFSET
            if group not in kept:
                stats.skip(str(index))  # beyond limit, or a copy without its original (VLMEvalKit drops it)
                continue
            stats.n_rows += 1
            item = self._item(index, r, letters, images, decoded)
            if isinstance(item, str):
                stats.add_malformed(where, item)
                bad_groups.add(group)
            else:
                items.append(item)
        for it in items:  # a circular score needs every copy: drop the whole question
            if it.meta["group"] in bad_groups:
                stats.add_malformed(f"index {it.id}", f"another row of question {it.meta['group']} is unusable")
        return [it for it in items if it.meta["group"] not in bad_groups], stats

    @staticmethod
    def _item(index: int, r: dict, letters: list[str], images: dict[int, str], decoded: dict[int, bytes]) -> EvalItem | str:
        """The row's item, or why it is unusable."""
        if is_na(r.get("question")):
            return "empty question"
        choices = {c: r[c] for c in letters if not is_na(r.get(c))}
        shown = []
        for c in PROMPT_LETTERS:
            if is_na(r.get(c)):
                break
            shown.append(r[c])
        if len(shown) < 2:
            return "fewer than 2 options"
        answer = (r.get("answer") or "").strip()
        if answer not in choices:
            return f"answer {answer!r} is not one of the options {', '.join(choices)}"
        img = _image(r.get("image"), images, decoded)
        if isinstance(img, str):
            return img
        hint = None if is_na(r.get("hint")) else r["hint"]
        prompt = mmbench_prompt(r["question"], hint, shown)
        meta = {"group": index % CIRCULAR_OFFSET, "answer": answer, "choices": choices,
                "category": r.get("category") or "", "l2_category": r.get("l2-category") or ""}
        extra = {"round_id": 0, "options": shown, "option_char": list(PROMPT_LETTERS[: len(shown)])}
        return EvalItem(str(index), img, f"{prompt}\n{LETTER_PROMPT}", meta, question_id=index, prompt=prompt, extra=extra)

    def score(self, items: list[EvalItem], predictions: Mapping[str, str]) -> dict[str, float]:
        rows_right: dict[int, list[bool]] = defaultdict(list)
        original_right: dict[int, bool] = {}
        cats: dict[int, tuple[str, str]] = {}
        unmatched = missing = 0
        for it in items:
            p = predictions.get(it.id)
            missing += p is None
            letter = None if p is None else scoring.can_infer(p, it.meta["choices"])
            unmatched += p is not None and letter is None
            ok = letter == it.meta["answer"]
            g = it.meta["group"]
            rows_right[g].append(ok)
            cats[g] = (it.meta["category"], it.meta["l2_category"])
            if int(it.id) == g:
                original_right[g] = ok
        circular = {g: all(v) for g, v in rows_right.items()}
        n = len(circular)
        out = {
            "score": scoring.percent(sum(circular.values()), n),
            "circular_accuracy": scoring.percent(sum(circular.values()), n),
            "vanilla_accuracy": scoring.percent(sum(original_right.values()), len(original_right)),
        }
        per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for g, ok in circular.items():
            for prefix, c in zip(("cat", "l2"), cats[g]):
                if c:
                    per[f"{prefix}/{c}"][0] += ok
                    per[f"{prefix}/{c}"][1] += 1
        out.update({k: scoring.percent(r, t) for k, (r, t) in sorted(per.items())})
        out.update(n_questions=float(n), n=float(len(items)), n_unmatched=float(unmatched), n_missing=float(missing))
        return out


def _image(text: str | None, by_index: dict[int, str], cache: dict[int, bytes]) -> bytes | str:
    """Decoded image bytes, or why not. A short all-digit cell refers to another row's image."""
    if is_na(text):
        return "empty image"
    text = text.strip()
    ref = int(text) if len(text) <= 64 and text.isdigit() else None
    if ref is not None:
        if ref in cache:
            return cache[ref]
        if ref not in by_index:
            return f"image refers to row index {ref}, which has no image"
        text = by_index[ref]
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
