"""Answer files in LLaVA's format: reading (bad lines counted, never fatal), appending after a kill,
matching rows to questions, and every benchmark's rows keying back to their own questions."""

import errno
import json
from pathlib import Path

import pytest

from alignkd.errors import DataError
from alignkd.eval.answers import AnswerWriter, answer_row, match_answers, read_answer_rows
from alignkd.eval.benchmarks import BENCHMARKS, EvalItem


def test_read_counts_lines_that_are_not_rows(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"question_id": 1, "prompt": "p", "text": "yes"}\n'
                 "\n"  # blank: ignored, not counted
                 '{"question_id": 2, "prompt": "p"}\n'  # no text
                 "[1, 2]\n"  # not an object
                 '{"question_id": 3, "text": "no"}\n'  # no prompt: fine (GQA, POPE need none)
                 '{"question_id": 4, "te')  # torn last line of a killed run
    rows = read_answer_rows(f)
    assert [r["question_id"] for r in rows.rows] == [1, 3] and rows.n_bad_lines == 3


def test_a_line_ends_at_newline_only(tmp_path):
    """U+2028 and U+0085 are line breaks to str.splitlines, not to JSON lines (our writer keeps them raw:
    ensure_ascii=False); the answer holding one was cut in two and scored wrong. Unusable JSON (nesting deeper
    than the stack, a 5000-digit id) is a bad line, not a crash."""
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"question_id": 1, "text": "red\u2028circle"}, ensure_ascii=False) + "\n"
                 + json.dumps({"question_id": 2, "text": "a\x85b"}, ensure_ascii=False) + "\n"
                 + "[" * 100_000 + "]" * 100_000 + "\n" + '{"question_id": ' + "9" * 5000 + ', "text": "x"}\n',
                 encoding="utf-8")
    rows = read_answer_rows(f)
    assert [r["text"] for r in rows.rows] == ["red\u2028circle", "a\x85b"] and rows.n_bad_lines == 2


def test_an_unknown_id_with_a_lone_surrogate_is_printable():
    m = match_answers([{"question_id": "\ud800x", "text": "a"}], {"1"}, lambda r: (str(r["question_id"]),))
    assert m.unknown == ["\\ud800x"] and m.unknown[0].encode("utf-8")


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="answer file .*nope.jsonl not found"):
        read_answer_rows(tmp_path / "nope.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="bin.jsonl"):
        read_answer_rows(tmp_path / "bin.jsonl")


def test_writer_cuts_a_torn_line_and_keeps_a_complete_one(tmp_path):
    item = EvalItem("7", "x.png", "q?", question_id=7, prompt="q?")
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "te')
    w = AnswerWriter(torn, "m")
    assert w.cut == len('{"question_id": 2, "te')  # the caller says how much it cut
    w.write([(item, "yes")])
    w.close()
    lines = torn.read_text().splitlines()
    assert [json.loads(ln)["question_id"] for ln in lines] == [1, 7]  # the torn row is gone, the file is valid
    done = tmp_path / "done.jsonl"
    done.write_text('{"question_id": 1, "text": "a"}')  # complete, only its newline missing
    w = AnswerWriter(done, "m")
    assert w.cut == 0
    w.write([(item, "no")])
    w.close()
    assert [json.loads(ln)["question_id"] for ln in done.read_text().splitlines()] == [1, 7]


def test_row_format_is_llavas():
    item = EvalItem("5", "x.png", "q?\nAnswer.", question_id=5, prompt="q?", extra={"round_id": 0})
    row = answer_row(item, "Yes", "alignkd")
    assert list(row) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata", "round_id"]
    assert (row["question_id"], row["prompt"], row["text"], row["model_id"], row["metadata"]) == (5, "q?", "Yes", "alignkd", {})


def test_match_counts_unknown_unscored_and_duplicates():
    rows = [{"question_id": q, "text": t} for q, t in ((1, "a"), (2, "b"), (1, "c"), (9, "d"), (8, "e"))]
    m = match_answers(rows, {"1", "2"}, lambda r: (str(r["question_id"]),), unscored={"8"})
    assert m.predictions == {"1": "c", "2": "b"}  # the last answer to a question counts
    assert (m.n_rows, m.n_duplicates, m.n_unknown, m.unknown, m.n_unscored) == (5, 1, 1, ["9"], 1)


@pytest.mark.parametrize("name", ["gqa", "sqa", "textvqa", "pope", "mme", "mmbench"])
def test_our_rows_key_back_to_their_questions(assets, name):
    # what our runs write is what the official converters read: each row finds its own question
    bench = BENCHMARKS[name]
    items, _ = bench.load(assets)
    ids = {it.id for it in items}
    for it in items:
        row = json.loads(json.dumps(answer_row(it, "x", "m")))
        assert match_answers([row], ids, bench.answer_keys).predictions == {it.id: "x"}


def test_a_full_disk_names_the_answer_file(tmp_path, monkeypatch):
    w = AnswerWriter(tmp_path / "a.jsonl", "m")

    def full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("alignkd.eval.answers.os.fsync", full)
    with pytest.raises(OSError) as e:
        w.write([(EvalItem("1", "x.png", "q"), "yes")])
    assert (e.value.errno, e.value.filename) == (28, str(tmp_path / "a.jsonl"))
    w.close()


def test_a_full_disk_is_named_by_the_answer_file_even_at_close():
    """After a failed write, close() flushed the same buffer again and its error, without the file's name,
    replaced the one that named it."""
    w = AnswerWriter(Path("/dev/full"), "m")  # every write fails: no space left on device
    item = EvalItem(id="1", image="x.png", question="q", question_id="1", prompt="q")
    for call in (lambda: w.write([(item, "yes")]), w.close):  # a short row stays in the buffer for close
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENOSPC and e.value.filename == "/dev/full"
