"""Answer files in LLaVA / MobileVLM's format: one JSON object per line,
{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} (+ MMBench's round_id,
options, option_char). Our eval writes them (appending as it goes, so a killed run resumes) and
`eval --answers` scores them, so answers go both ways between us and the official scripts.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkd.errors import DataError
from alignkd.fileio import BAD_JSON

from .benchmarks import EvalItem

MAX_EXAMPLES = 5


@dataclass
class AnswerRows:
    """The usable rows of an answer file, and how many lines were not (a torn last line of a killed
    run included)."""

    rows: list[dict] = field(default_factory=list)
    n_bad_lines: int = 0


@dataclass
class Matched:
    """Answer rows matched to a benchmark's items."""

    predictions: dict[str, str] = field(default_factory=dict)  # item id -> reply text
    n_rows: int = 0
    n_unknown: int = 0  # rows whose question the benchmark does not know
    unknown: list[str] = field(default_factory=list)  # their first question ids
    n_duplicates: int = 0  # rows answering a question already answered (the last one counts)
    n_unscored: int = 0  # rows for questions the benchmark knows but does not score (e.g. beyond --limit)


def answer_row(item: EvalItem, text: str, model_id: str) -> dict:
    return {"question_id": item.question_id, "prompt": item.prompt, "text": text,
            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}, **item.extra}


def read_answer_rows(path: Path) -> AnswerRows:
    """The rows with a question_id and a text; other lines are counted, never fatal."""
    path = Path(path)
    if not path.is_file():
        what = ("is a folder" if path.is_dir() else "is not a regular file (a pipe or a device)" if path.exists()
                else "not found")
        raise DataError(f"answer file {path} {what} (JSON lines {{\"question_id\", \"prompt\", \"text\", ...}})")
    try:
        # lines end at "\n" only: a JSON string may hold U+2028 or U+0085, where str.splitlines would cut it
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # a byte-order mark is not part of line 1
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read answer file {path} as UTF-8 JSON lines: {e}") from e
    out = AnswerRows()
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except BAD_JSON:
            out.n_bad_lines += 1
            continue
        if isinstance(row, dict) and "question_id" in row and isinstance(row.get("text"), str):
            out.rows.append(row)
        else:
            out.n_bad_lines += 1
    return out


def match_answers(rows: Iterable[Mapping[str, Any]], item_ids: set[str],
                  keys: Callable[[Mapping[str, Any]], tuple[str, ...]], unscored: set[str] = frozenset()) -> Matched:
    """Each row goes to the first of its candidate keys that is an item id; rows naming a question
    the benchmark knows but does not score are counted apart from unknown ones."""
    m = Matched()
    for row in rows:
        m.n_rows += 1
        cands = keys(row)
        hit = next((k for k in cands if k in item_ids), None)
        if hit is not None:
            m.n_duplicates += hit in m.predictions
            m.predictions[hit] = row["text"]
        elif any(k in unscored for k in cands):
            m.n_unscored += 1
        else:
            m.n_unknown += 1
            if len(m.unknown) < MAX_EXAMPLES:
                # printable as given: an id may hold a lone surrogate ("\ud800" in the JSON)
                m.unknown.append(str(row["question_id"]).encode("utf-8", "backslashreplace").decode())
    return m


class AnswerWriter:
    """Appends rows to an answer file, each batch flushed and fsynced: a kill loses at most the
    batch being written. A torn last line left by an earlier kill is cut off first, so the file
    stays valid JSON lines for the official scripts."""

    def __init__(self, path: Path, model_id: str):
        self.path, self.model_id = Path(path), model_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cut = _cut_torn_tail(self.path)  # bytes of a torn last line removed
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, pairs: Iterable[tuple[EvalItem, str]]) -> None:
        try:
            for item, text in pairs:
                self._f.write(json.dumps(answer_row(item, text, self.model_id), ensure_ascii=False) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # name the file (a full disk): the next run cuts the torn line and resumes
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def close(self) -> None:
        try:  # after a failed write, closing flushes the same buffer again: name the file this time too
            self._f.close()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from e


def _cut_torn_tail(path: Path) -> int:
    """A last line without its newline is a write cut short, unless it parses (then only the newline
    is missing): cut it off, or finish it. Returns how many bytes were cut."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return 0
    head, sep, tail = data.rpartition(b"\n")
    try:
        json.loads(tail)
        complete = True
    except ValueError:
        complete = False
    with open(path, "r+b") as f:
        if complete:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(len(head) + len(sep))
        f.flush()
        os.fsync(f.fileno())
    return 0 if complete else len(tail)
