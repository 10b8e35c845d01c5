"""MME perception (MME-P): 10 subtasks, 2 yes/no questions per image, as MME's eval_tool scores it.

Files: MME_Benchmark_release_version as it unpacks, one folder per subtask. In existence, count,
position, color and OCR the images and their question files lie side by side ({subtask}/NAME.jpg|png
+ {subtask}/NAME.txt); in posters, celebrity, scene, landmark and artwork they are split into
{subtask}/images/NAME.jpg and {subtask}/questions_answers_YN/NAME.txt. Each txt line:
"question<TAB>Yes|No". `data_root` is that folder, or one holding it: LLaVA-1.5's
playground/data/eval/MME (MME_Benchmark_release_version/ inside), MobileVLM's
data/benchmark_data/mme (the release linked as images/), the Hugging Face copy's
MME_Benchmark_release_version/MME_Benchmark/, or a folder holding MME/ or mme/.

Prompt (LLaVA's llava_mme.jsonl): the question without "Please answer yes or no.", stripped, then
the short-answer instruction. question_id: the image path in the release ("artwork/images/10002.jpg",
"existence/000000006040.jpg"), shared by the image's two questions, as in llava_mme.jsonl.
An answer-file row is matched to its question as LLaVA's convert_answer_to_mme.py does: subtask =
question_id up to the first "/", file = the name's part before its first "." + ".txt", question =
the prompt without the short-answer instruction, stripped, + " Please answer yes or no." (or with
two spaces, as some release lines have it).
Score (MME's eval_tool/calculation.py): a reply is read as yes/no when it is exactly that (lower-
cased), else when "yes", then "no", occurs in its first 4 characters, else "other" (wrong); per
subtask acc = right questions / questions and acc+ = images with both questions right / images,
subtask score = 100·acc + 100·acc+ (out of 200); perception = Σ of the 10 subtask scores (out of
2000). A question without a reply scores as wrong.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alignkd.data.templates import SHORT_ANSWER_PROMPT, short_answer
from alignkd.errors import DataError

from .. import scoring
from .base import Benchmark, EvalItem, Layout, LoadStats, check_limit, find_image, locate

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
YES_NO = "Please answer yes or no."
_TXT = "{subtask}/NAME.jpg|png + NAME.txt, or {subtask}/images/ + {subtask}/questions_answers_YN/"
LAYOUTS = (
    Layout("the release (MME_Benchmark_release_version)", "existence", _TXT),
    Layout("LLaVA-1.5's playground/data/eval/MME", "MME_Benchmark_release_version/existence",
           "MME_Benchmark_release_version/" + _TXT),
    Layout("MobileVLM's data/benchmark_data/mme", "images/existence", "images/" + _TXT),
    Layout("the Hugging Face copy", "MME_Benchmark/existence", "MME_Benchmark/" + _TXT),
    Layout("LLaVA-1.5's MME with the Hugging Face copy", "MME_Benchmark_release_version/MME_Benchmark/existence",
           "MME_Benchmark_release_version/MME_Benchmark/" + _TXT),
)


def _key(subtask: str, txt_name: str, question: str) -> str:
    return json.dumps([f"{subtask}/{txt_name}", question])


def model_question(question: str) -> str:
    """llava_mme.jsonl's question: the release's, without "Please answer yes or no.", stripped."""
    return question.replace(YES_NO, "").strip()


class MME(Benchmark):
    name = "mme"
    rule = ("MME eval_tool/calculation.py: perception = Σ of the 10 subtask scores, each 100·acc + 100·acc+ "
            "(acc+: both questions of an image right); a reply is yes/no when it is that or its first 4 characters hold it")

    def __init__(self, subtasks: tuple[str, ...] = PERCEPTION):
        self.subtasks = tuple(subtasks)

    def answer_keys(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        qid, prompt = str(row["question_id"]), row.get("prompt")
        if not isinstance(prompt, str):
            return ()
        subtask, txt = qid.split("/")[0], qid.split("/")[-1].split(".")[0] + ".txt"
        if SHORT_ANSWER_PROMPT in prompt:
            prompt = prompt.replace(SHORT_ANSWER_PROMPT, "").strip()
        if YES_NO in prompt:
            return (_key(subtask, txt, prompt),)
        one = f"{prompt} {YES_NO}"
        return _key(subtask, txt, one), _key(subtask, txt, one.replace(f" {YES_NO}", f"  {YES_NO}"))

    def load(self, data_root: Path | None, limit: int | None = None) -> tuple[list[EvalItem], LoadStats]:
        check_limit(limit)
        folder, layout = locate(self.name, data_root, ("MME", "mme"), LAYOUTS)
        root = (folder / layout.marker).parent
        missing = [s for s in self.subtasks if not (root / s).is_dir()]
        if missing:
            raise DataError(f"mme: expected subtask folder(s) {', '.join(str(root / s) for s in missing)} "
                            f"({_TXT}; txt lines 'question<TAB>Yes|No')")
        stats = LoadStats(source=f"{layout.name}: {root}")
        items: list[EvalItem] = []
        n_images = 0
        for sub in self.subtasks:
            for txt, img, lines in self._subtask(root, sub, stats):
                if limit is not None and n_images >= limit:
                    stats.n_skipped += len(lines)
                    stats.unscored.update(_key(sub, txt.name, q) for q, _ in self._questions(sub, txt, lines, LoadStats()))
                    continue
                stats.n_rows += len(lines)
                good = self._questions(sub, txt, lines, stats)
                where = f"{sub}/{txt.name}"
                if img is None:
                    for _ in good:
                        stats.add_malformed(where, f"no image {txt.stem}.jpg|png beside it")
                    continue
                qid = img.relative_to(root).as_posix()
                mine = []
                for q, a in good:
                    text = short_answer(model_question(q))
                    if _key(sub, txt.name, q) not in self.answer_keys({"question_id": qid, "prompt": text}):
                        # e.g. a dot in the file name, or no "Please answer yes or no." to put back
                        stats.add_malformed(where, f"convert_answer_to_mme.py cannot match {q!r} back from its prompt")
                        continue
                    mine.append(EvalItem(_key(sub, txt.name, q), str(img), text,
                                         {"subtask": sub, "image_key": f"{sub}/{txt.name}", "answer": a}, question_id=qid))
                n_images += bool(mine)
                items += mine
        self._known_cognition(root, stats)
        return items, stats

    def _known_cognition(self, root: Path, stats: LoadStats) -> None:
        """The cognition questions' ids: LLaVA's answer files hold them too; known, not scored."""
        for sub in COGNITION:
            try:
                for txt, _, lines in self._subtask(root, sub, LoadStats()) if (root / sub).is_dir() else ():
                    stats.unscored.update(_key(sub, txt.name, q) for q, _ in self._questions(sub, txt, lines, LoadStats()))
            except DataError:  # a cognition folder we do not score is not worth refusing the benchmark
                continue

    @staticmethod
    def _subtask(root: Path, sub: str, stats: LoadStats):
        """(txt path, image path or None, its non-blank lines) per question file of a subtask."""
        sdir = root / sub
        if (sdir / "images").is_dir():  # convert_answer_to_mme.py's test: images/ means the split layout
            qdir, idir = sdir / "questions_answers_YN", sdir / "images"
            if not qdir.is_dir():
                raise DataError(f"mme: {sdir} has images/ but no questions_answers_YN/ beside it")
        else:
            qdir = idir = sdir
        txts = sorted(qdir.glob("*.txt"))
        if not txts:
            raise DataError(f"mme: no question files (*.txt) in {qdir} ({_TXT})")
        for txt in txts:
            try:
                lines = [ln for ln in txt.read_text(encoding="utf-8").split("\n") if ln.strip()]  # as readlines()
            except (OSError, UnicodeDecodeError) as e:
                stats.n_rows += 1
                stats.add_malformed(f"{sub}/{txt.name}", f"unreadable ({e})")
                continue
            yield txt, find_image(idir, txt.stem), lines

    @staticmethod
    def _questions(sub: str, txt: Path, lines: list[str], stats: LoadStats) -> list[tuple[str, str]]:
        """(question, 'yes'|'no') of each usable line, split as convert_answer_to_mme.py splits it."""
        good = []
        for k, ln in enumerate(lines, 1):
            parts = ln.strip().split("\t")
            where = f"{sub}/{txt.name}:{k}"
            if len(parts) != 2 or not parts[0]:
                stats.add_malformed(where, "line is not 'question<TAB>answer'")
            elif parts[1].lower() not in ("yes", "no"):
                stats.add_malformed(where, f"answer {parts[1]!r} is not Yes/No")
            else:
                good.append((parts[0], parts[1].lower()))
        return good

    def score(self, items: list[EvalItem], predictions: Mapping[str, str]) -> dict[str, float]:
        per_sub: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
        missing = 0
        for it in items:
            p = predictions.get(it.id)
            missing += p is None
            per_sub[it.meta["subtask"]][it.meta["image_key"]].append((it.meta["answer"], "" if p is None else str(p)))
        out: dict[str, float] = {}
        total = n_other = 0.0
        for sub in [s for s in PERCEPTION if s in per_sub]:
            m = scoring.mme_subtask_metrics(per_sub[sub].values())
            out.update({f"{sub}_acc": m["acc"], f"{sub}_acc_plus": m["acc_plus"], f"{sub}_score": m["score"]})
            n_other += m["n_other"]
            total += m["score"]
        out.update(perception=total, score=total, n_subtasks=float(len(per_sub)), n_unparsed=n_other,
                   n=float(len(items)), n_missing=float(missing))
        return out
