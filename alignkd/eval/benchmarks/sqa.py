"""ScienceQA-IMG: the test questions that have an image (2,017 of 4,241), as LLaVA-1.5 / MobileVLM score it.

Files (`data_root` = the folder below, or a folder holding it as `scienceqa/` (LLaVA-1.5),
`sqa/` (MobileVLM) or `data/scienceqa/` (the ScienceQA repository)), the same in every layout:
  problems.json     ({pid: {"question", "choices": [...], "answer": int, "hint", "image": "image.png" | null}})
  pid_splits.json   ({"test": [pid, ...], ...})
  images/test/{pid}/image.png
  (LLaVA's llava_test_CQM-A.json holds the same prompts; not needed)

Prompt (llava_test_CQM-A.json + --single-pred-prompt): see `sqa_prompt`. question_id: the pid; the
answer file's prompt starts with "<image>\\n", as model_vqa_science writes it, which is how
eval_science_qa.py tells the image questions apart.
Score (LLaVA's eval_science_qa.py, its IMG-Accuracy): the reply's letter is the whole reply if it is
one of A-E, else its first character when followed by ". ", else the one match of "The answer is
X." (no stripping, case-sensitive); right iff that letter's index is the answer. eval_science_qa.py
leaves an unanswered question out of IMG-Accuracy; here it scores as wrong and is counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from alignkd.data.templates import IMAGE_TOKEN
from alignkd.errors import DataError

from .. import scoring
from .base import (LETTER_PROMPT, Benchmark, EvalItem, Layout, LoadStats, check_limit, locate, mean_scores,
                   read_json, text_field)

SPLIT = "test"
LAYOUTS = (
    Layout("the ScienceQA release (data/scienceqa), LLaVA-1.5's scienceqa/ or MobileVLM's sqa/", "problems.json",
           f"problems.json + pid_splits.json + images/{SPLIT}/{{pid}}/image.png"),
)


def sqa_prompt(problem: dict) -> str:
    """LLaVA-1.5's ScienceQA question: "Context: {hint}" (only when the hint is not empty), the
    question, one "A. choice" line per choice, then the letter instruction, one per line."""
    hint = (problem.get("hint") or "").strip()
    parts = ([f"Context: {hint}"] if hint else []) + [problem["question"]]
    parts += [f"{scoring.SQA_OPTIONS[i]}. {c}" for i, c in enumerate(problem["choices"])]
    return "\n".join(parts).strip() + "\n" + LETTER_PROMPT


class ScienceQA(Benchmark):
    name = "sqa"
    rule = ("LLaVA eval_science_qa.py IMG-accuracy: the letter from a reply 'X', 'X. …' or one 'The answer is X.', "
            "right iff it is the answer")

    def load(self, data_root: Path | None, limit: int | None = None) -> tuple[list[EvalItem], LoadStats]:
        check_limit(limit)
        folder, layout = locate(self.name, data_root, ("scienceqa", "sqa", "data/scienceqa"), LAYOUTS)
        problems = read_json(folder / "problems.json", self.name,
                             '{pid: {"question", "choices", "answer", "hint", "image", ...}} JSON')
        splits = read_json(folder / "pid_splits.json", self.name, '{"test": [pid, ...], ...} JSON')
        if not isinstance(problems, dict):
            raise DataError(f"sqa: {folder / 'problems.json'} must hold a JSON object {{pid: problem}}")
        if not isinstance(splits, dict) or not isinstance(splits.get(SPLIT), list):
            raise DataError(f"sqa: {folder / 'pid_splits.json'} has no list under \"{SPLIT}\"")
        stats = LoadStats(source=f"{layout.name}: {folder / 'problems.json'}")
        items = []
        for pid in map(str, splits[SPLIT]):
            prob = problems.get(pid)
            if isinstance(prob, dict) and not prob.get("image"):
                stats.skip(pid)  # a text-only question: not part of SQA-IMG
                continue
            if limit is not None and len(items) >= limit:
                stats.skip(pid)
                continue
            stats.n_rows += 1
            where = f"problems.json[{pid}]"
            if not isinstance(prob, dict):
                stats.add_malformed(where, "listed in pid_splits.json but missing from problems.json")
                continue
            if reason := self._problem_fault(prob):
                stats.add_malformed(where, reason)
                continue
            img = folder / "images" / SPLIT / pid / str(prob["image"])
            if not img.is_file():
                stats.add_malformed(where, f"image {img} not found")
                continue
            question = sqa_prompt(prob)
            items.append(EvalItem(pid, str(img), question, {"answer": prob["answer"], "n_choices": len(prob["choices"])},
                                  prompt=f"{IMAGE_TOKEN}\n{question}"))
        return items, stats

    @staticmethod
    def _problem_fault(prob: dict) -> str | None:
        choices, answer = prob.get("choices"), prob.get("answer")
        if not text_field(prob.get("question")):
            return "missing question"
        if prob.get("hint") is not None and not isinstance(prob["hint"], str):  # the prompt puts it first
            return f"hint {prob['hint']!r} is not text"
        if (not isinstance(choices, list) or not 2 <= len(choices) <= len(scoring.SQA_OPTIONS)
                or not all(isinstance(c, str) for c in choices)):
            return f"choices must be 2..{len(scoring.SQA_OPTIONS)} strings"
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            return f"answer {answer!r} is not an index into the choices"
        return None

    def score(self, items: list[EvalItem], predictions: Mapping[str, str]) -> dict[str, float]:
        def judge(p: str, it: EvalItem) -> dict[str, float]:
            idx = scoring.sqa_pred_index(scoring.parse_sqa_letter(p), it.meta["n_choices"])
            return {"accuracy": idx == it.meta["answer"], "unparsed_rate": idx == -1}

        return mean_scores(items, predictions, judge)
