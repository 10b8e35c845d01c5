"""easy-vqa (MIT; shipped in the `easy-vqa` package): the embedded default task, read in one place.

5,000 64×64 PNG shape images (4,000 train / 1,000 test), 38,575 train and 9,673 test questions, 13
one-word answers (shapes, colours, yes/no). Training (`alignkd.data.datasets`), evaluation
(`alignkd.eval`) and the export's fixed parity image all read it through `questions` / `image_paths`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError

SPLITS = ("train", "test")
ANSWERS = (
    "circle", "rectangle", "triangle",
    "red", "green", "blue", "black", "gray", "teal", "brown", "yellow",
    "yes", "no",
)


@dataclass(frozen=True)
class Question:
    index: int
    """Position in the package's question list of the split (a stable id)."""
    question: str
    answer: str
    image: Path


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise DataError("easy-vqa: the `easy-vqa` package is not installed (pip install easy-vqa==1.0)") from None
    return easy_vqa


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"easy-vqa split must be one of {', '.join(SPLITS)}, got {split!r}")


def image_paths(split: str) -> dict[int, Path]:
    """{image id: PNG path} of a split."""
    _check_split(split)
    pkg = _package()
    paths = pkg.get_train_image_paths() if split == "train" else pkg.get_test_image_paths()
    return {int(k): Path(v) for k, v in paths.items()}


def questions(split: str, limit: int | None = None, seed: int = 0) -> list[Question]:
    """The questions of a split in package order; `limit` keeps a seeded random subset (still in order)."""
    _check_split(split)
    pkg = _package()
    qs, answers, image_ids = pkg.get_train_questions() if split == "train" else pkg.get_test_questions()
    paths = image_paths(split)
    order = list(range(len(qs)))
    if limit is not None and limit < len(order):
        order = sorted(random.Random(seed).sample(order, limit))
    return [Question(i, qs[i], answers[i], paths[int(image_ids[i])]) for i in order]


def first_test_image() -> Path:
    """A fixed real image: the test image with the smallest id (the export's parity image)."""
    paths = image_paths("test")
    return paths[min(paths)]
