"""Benchmark readers for `alignkd-mobile eval`, one file per benchmark behind the `Benchmark` protocol.

Each reads its benchmark's files as the public release unpacks them *and* as LLaVA-1.5's
(playground/data/eval/<bench>) and MobileVLM's (data/benchmark_data/<bench>) evaluation instructions
lay them out; `data_root` may be the benchmark's folder or the eval folder holding all of them.
Each scores replies exactly as the official script does (its module docstring names the script and
the rules), and names its questions with the official question ids, so that an answer file (JSON
lines {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}) goes both ways between
us and LLaVA / MobileVLM's scripts.

=========  ======================================================================================
easyvqa    nothing: the test split shipped in the `easy-vqa` package (data_root is ignored)
gqa        testdev_balanced_questions.json + images/{imageId}.jpg           (release; MobileVLM gqa/)
           data/testdev_balanced_questions.json + data/images/{imageId}.jpg (LLaVA-1.5 gqa/)
sqa        problems.json + pid_splits.json + images/test/{pid}/image.png
           (ScienceQA's data/scienceqa, LLaVA-1.5's scienceqa/, MobileVLM's sqa/)
textvqa    TextVQA_0.5.1_val.json + train_images/{image_id}.jpg, with LLaVA's
           llava_textvqa_val_v051_ocr.jsonl or TextVQA_Rosetta_OCR_v0.2_val.json for OCR tokens
pope       coco_pope_{adversarial,random,popular}.json + val2014/        (POPE's output/coco)
           coco/coco_pope_{adversarial,random,popular}.json + val2014/   (LLaVA-1.5 / MobileVLM pope/)
mme        MME_Benchmark_release_version/: {subtask}/NAME.jpg|png + NAME.txt (existence, count,
           position, color, OCR) or {subtask}/images/ + {subtask}/questions_answers_YN/ (posters,
           celebrity, scene, landmark, artwork); in LLaVA-1.5's MME/ or as MobileVLM's mme/images
mmbench    mmbench_dev_en_20231003.tsv, mmbench_dev_20230712.tsv, MMBench_DEV_EN.tsv or
           MMBench_DEV_EN_V11.tsv (the first found; LLaVA-1.5's / MobileVLM's mmbench/)
=========  ======================================================================================

`load(data_root, limit=None)`: `limit` keeps a deterministic part for smoke runs: the first N
questions in file order (per split for POPE; the first N images for MME; the first N questions,
each with all its circular copies, for MMBench), a seeded random subset of N for easy-vqa.

A folder in none of a benchmark's layouts raises one `DataError` naming every expected layout. A
row that cannot be used (missing field, bad label, missing image ...) is not an item: it is
counted in `LoadStats` with the first few reasons, so the caller can report it. Every rate is in
percent; MME is in its own points (perception out of 2000). The headline number is "score".
"""

from __future__ import annotations

from alignkd.data.templates import SHORT_ANSWER_PROMPT
from alignkd.errors import ConfigError

from .base import LETTER_PROMPT, Benchmark, EvalItem, Layout, LoadStats
from .easyvqa import EasyVQA
from .gqa import GQA
from .mmbench import MMBench
from .mme import MME
from .pope import POPE
from .sqa import ScienceQA
from .textvqa import TextVQA

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


__all__ = [
    "BENCHMARKS", "get_benchmark", "Benchmark", "EvalItem", "LoadStats", "Layout", "SHORT_ANSWER_PROMPT",
    "LETTER_PROMPT", "EasyVQA", "GQA", "ScienceQA", "TextVQA", "POPE", "MME", "MMBench",
]
