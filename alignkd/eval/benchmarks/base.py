"""What every benchmark reader shares: the item and load-statistics types, the `Benchmark` protocol,
finding a benchmark's folder in whichever layout the user has, and reading its JSON / JSON-lines /
TSV rows with one error style (a `DataError` naming the file and the expected format)."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from alignkd.errors import ConfigError, DataError
from alignkd.fileio import BAD_JSON

from .. import scoring

# LLaVA-1.5 / MobileVLM's instruction for multiple-choice questions (ScienceQA, MMBench)
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass
class EvalItem:
    """One question put to the model, and how its answer is filed.

    `question` is the user turn without `<image>` and without the chat template (the runner adds
    both). `question_id` and `prompt` are what LLaVA / MobileVLM's answer files hold for this
    question, so that the official scripts can read our answer files; `extra` holds the further
    fields some of those files carry (MMBench: round_id, options, option_char).
    """

    id: str  # unique within the benchmark; what `Benchmark.answer_keys` maps an answer-file row to
    image: str | bytes  # path to an image file, or the encoded bytes (MMBench)
    question: str
    meta: dict = field(default_factory=dict)  # what the scorer needs
    question_id: Any = None  # default: id
    prompt: str | None = None  # default: question
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.question_id is None:
            self.question_id = self.id
        if self.prompt is None:
            self.prompt = self.question


@dataclass
class LoadStats:
    """What `load` read: rows seen, rows unusable (with the first few reasons), rows skipped on
    purpose (e.g. ScienceQA questions without an image, rows beyond `limit`), where the data came
    from, and the ids of questions the benchmark knows but does not score (so that an answer to one
    of them is not reported as an unknown id)."""

    n_rows: int = 0
    n_malformed: int = 0
    malformed: list[str] = field(default_factory=list)  # "where: reason", the first MAX_EXAMPLES
    n_skipped: int = 0
    notes: list[str] = field(default_factory=list)
    source: str = ""  # the layout and main file read
    unscored: set[str] = field(default_factory=set)
    limited: bool = False  # `limit` left questions out: an answer to one of them is not an unknown id

    MAX_EXAMPLES = 5

    def add_malformed(self, where: str, reason: str) -> None:
        self.n_malformed += 1
        if len(self.malformed) < self.MAX_EXAMPLES:
            self.malformed.append(f"{where}: {reason}")

    def skip(self, key: str | None = None) -> None:
        self.n_skipped += 1
        if key is not None:
            self.unscored.add(key)

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
    """A benchmark: local files in its public layout in, items out, and its official scoring."""

    name: str
    rule: str  # the official rule its headline number follows, for the report

    def load(self, data_root: Path | None, limit: int | None = None) -> tuple[list[EvalItem], LoadStats]: ...

    def score(self, items: list[EvalItem], predictions: Mapping[str, str]) -> dict[str, float]: ...

    def answer_keys(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        """Candidate item ids of an answer-file row, most likely first (most benchmarks: the
        question id; MME and TextVQA need the prompt too, as their official converters do)."""
        return (str(row["question_id"]),)


# --------------------------------------------------------------------------------------------------
# finding the files


@dataclass(frozen=True)
class Layout:
    """One way a benchmark's files can lie in its folder."""

    name: str  # e.g. "LLaVA-1.5 (playground/data/eval/gqa)"
    marker: str  # a path, relative to the benchmark's folder, whose presence identifies the layout
    files: str  # the files, for the error message


def locate(bench: str, data_root: Path | str | None, folders: Sequence[str], layouts: Sequence[Layout]) -> tuple[Path, Layout]:
    """The benchmark's folder and its layout: `data_root` itself, or its subfolder named like the
    benchmark (so that `--data-root` may be the eval folder holding every benchmark). Neither →
    one DataError naming every expected layout."""
    if data_root is None:
        raise ConfigError(f"{bench}: --data-root is required (the folder holding the benchmark's files)")
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"{bench}: --data-root {root} is not a folder")
    tried = [root] + [root / f for f in folders]
    for d in tried:
        for lay in layouts:
            if (d / lay.marker).exists():
                return d, lay
    looked = f"{root}" + (f" and {root}/{{{','.join(folders)}}}" if folders else "")
    expected = "; or ".join(f"{lay.name}: {lay.files}" for lay in layouts)
    raise DataError(f"{bench}: no benchmark files found in {looked}; expected {expected}")


# --------------------------------------------------------------------------------------------------
# reading rows


def read_json(path: Path, bench: str, fmt: str) -> Any:
    if not path.is_file():
        raise DataError(f"{bench}: expected {path} ({fmt}); not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, *BAD_JSON) as e:
        raise DataError(f"{bench}: cannot read {path} as {fmt}: {e}") from e


def read_jsonl(path: Path, bench: str) -> Iterator[tuple[int, dict | str]]:
    """(line number, object) per non-blank line, or (line number, reason) when the line is not a
    JSON object: the caller counts it as malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except BAD_JSON as e:
                    yield lineno, f"not JSON ({e.msg})"
                    continue
                yield lineno, row if isinstance(row, dict) else "line is not a JSON object"
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{bench}: cannot read {path} as JSON lines: {e}") from e


def read_tsv(path: Path, bench: str, required: Sequence[str], fmt: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a tab-separated file with a header row (quoted cells as pandas reads them)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long cells
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            cols = list(reader.fieldnames or [])
            missing = [c for c in required if c not in cols]
            if missing:
                raise DataError(f"{bench}: {path} lacks column(s) {', '.join(missing)} (expected {fmt})")
            return cols, list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{bench}: cannot read {path} as {fmt}: {e}") from e


# --------------------------------------------------------------------------------------------------
# small shared rules


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")




def prediction(predictions: Mapping[str, str], item: EvalItem) -> tuple[str, bool]:
    """The answer to an item ('' when there is none: scored as wrong) and whether it was missing."""
    p = predictions.get(item.id)
    return ("", True) if p is None else (str(p), False)


def mean_scores(items: Sequence[EvalItem], predictions: Mapping[str, str],
                judge: Callable[[str, EvalItem], Mapping[str, float]]) -> dict[str, float]:
    """Each of `judge(answer, item)`'s values (in [0, 1]) as a mean over the items in %, its "accuracy" also
    as "score"; with n and n_missing (a missing answer is judged as '', so it scores as wrong)."""
    sums: dict[str, float] = {}
    missing = 0
    for it in items:
        p, miss = prediction(predictions, it)
        missing += miss
        for k, v in judge(p, it).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    n = len(items)
    sums = sums or {"accuracy": 0.0}  # no items
    return {"score": scoring.percent(sums["accuracy"], n), **{k: scoring.percent(v, n) for k, v in sums.items()},
            "n": float(n), "n_missing": float(missing)}


def text_field(x: Any) -> bool:
    return isinstance(x, str) and x.strip() != ""


def missing_fields(row: Mapping[str, Any], names: Sequence[str]) -> str | None:
    """'missing or empty a, b' for the named text fields that are absent or empty, else None."""
    bad = [n for n in names if not text_field(row.get(n))]
    return f"missing or empty {', '.join(bad)}" if bad else None


IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def find_image(folder: Path, stem: str) -> Path | None:
    return next((folder / (stem + s) for s in IMAGE_SUFFIXES if (folder / (stem + s)).is_file()), None)
