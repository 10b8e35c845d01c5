"""MMBench reader (the released TSVs, circular copies) and scorer: VLMEvalKit's circular evaluation with
exact matching (can_infer), by hand. The fixture TSV holds 3 usable questions, each with its copies:
Q0 red/green/blue/yellow (A) as rows 0, 1000000 (answer D), 2000000 (C), 3000000 (B); Q1 circle/
triangle/square (C) as 1 (C), 1000001 (B), 2000001 (A); Q2 yes/no (B) as 2 (B), 1000002 (A)."""

import csv
import shutil

import pytest

from alignkd.errors import DataError
from alignkd.eval.benchmarks import LETTER_PROMPT, MMBench

TSV = "mmbench_dev_20230712.tsv"


def by_id(items):
    return {it.id: it for it in items}


def test_reader(assets):
    items, stats = MMBench().load(assets)  # finds mmbench/mmbench_dev_20230712.tsv
    # 12 rows: row 3 answers "E" with 2 options (its copy 1000003 goes with it), row 4's image is not base64
    assert (stats.n_rows, stats.n_malformed, len(items)) == (12, 3, 9)
    assert [it.question_id for it in items] == [0, 1, 2, 1_000_000, 1_000_001, 1_000_002, 2_000_000, 2_000_001, 3_000_000]
    q = by_id(items)
    assert q["1"].question == (
        "The image shows a simple drawing.\nWhich shape is shown?\nA. circle\nB. triangle\nC. square\n" + LETTER_PROMPT)
    # model_vqa_mmbench's prompt field is without the instruction; round_id, options, option_char as it writes them
    assert q["1"].prompt + "\n" + LETTER_PROMPT == q["1"].question
    assert q["1000001"].extra == {"round_id": 0, "options": ["triangle", "square", "circle"], "option_char": ["A", "B", "C"]}
    # C = "None" and D = "" are missing values for pandas: Q2 shows two options
    assert q["2"].question == "Is the square above the circle?\nA. yes\nB. no\n" + LETTER_PROMPT
    assert q["2"].meta["choices"] == {"A": "yes", "B": "no"}
    # a copy whose image cell is "0" shares row 0's image
    assert isinstance(q["0"].image, bytes) and q["0"].image[:4] == b"\x89PNG" and q["3000000"].image == q["0"].image


def test_score_circular_exact_matching(assets, score_rows, answer):
    bench = MMBench()
    items, stats = bench.load(assets)
    replies = {
        0: "A",                    # A: right
        1_000_000: "The answer is D.",  # one letter among the last 4 words: D, right
        2_000_000: "red",          # no letter; option text "red" (C) is in the reply, "green" is not: C, right
        3_000_000: "B, red",       # B, right                       -> Q0 right in every copy: right
        1: "C.",                   # C, right
        1_000_001: "B or C",       # two letters: no option; no option text in it: unmatched, wrong -> Q1 wrong
        2_000_001: "A square",     # A (a word, not the article here), right
        2: "B",                    # right
        1_000_002: "no",           # option text "no" is A in this copy: right  -> Q2 right
    }
    m, _ = score_rows(bench, items, stats, [answer(k, "", v) for k, v in replies.items()])
    assert m["score"] == m["circular_accuracy"] == pytest.approx(200 / 3)  # Q0, Q2 of 3
    assert m["vanilla_accuracy"] == 100.0  # rows 0, 1, 2 all right
    assert m["cat/attribute_recognition"] == 100.0 and m["cat/object_localization"] == 0.0
    assert m["cat/spatial_relationship"] == 100.0
    assert m["l2/finegrained_perception (instance-level)"] == 50.0 and m["l2/relation_reasoning"] == 100.0
    assert (m["n_questions"], m["n"], m["n_unmatched"], m["n_missing"]) == (3, 9, 1, 0)
    # one copy without a reply is wrong: Q2 falls -> 1 of 3
    del replies[1_000_002]
    m, _ = score_rows(bench, items, stats, [answer(k, "", v) for k, v in replies.items()])
    assert m["score"] == pytest.approx(100 / 3) and m["n_missing"] == 1


def test_score_vlmevalkit_quirks(assets, score_rows, answer):
    bench = MMBench()
    items, stats = bench.load(assets)
    replies = {
        # 11 words, "A" is the 6th: not among the last 4; then "answer is A": A, right
        0: "I think the answer is A because the square is red",
        1_000_000: "D", 2_000_000: "C",
        3_000_000: "Sorry, I can't help with images of people yet.",  # a refusal: Z, wrong -> Q0 wrong
        1: "c",  # lower case is no letter, and "c" holds no option text: unmatched, wrong -> Q1 wrong
        1_000_001: "square",
        2_000_001: "The answer is based on the square",  # "answer is b" (any case): B, wrong (answer A)
        2: "no",  # option text: B, right
        # longer than twice the options' texts (2 x len("no" + "yes") = 10): no text match; "answer to
        # this question is no" is no "answer is X": unmatched, wrong -> Q2 wrong
        1_000_002: "Looking at the picture carefully, the answer to this question is no",
    }
    m, _ = score_rows(bench, items, stats, [answer(k, "", v) for k, v in replies.items()])
    assert m["score"] == 0.0
    assert m["vanilla_accuracy"] == pytest.approx(200 / 3)  # rows 0 and 2 right, row 1 wrong
    assert m["n_unmatched"] == 2  # "c" and the long reply; Z and B are matched (and wrong)


def test_answer_rows(assets, score_rows, answer):
    bench = MMBench()
    items, stats = bench.load(assets)
    rows = [answer("0", "", "A", round_id=0),  # a string id is the same question
            answer(0, "", "A", round_id=1),  # LLaVA --all-rounds' own shift: not a question of this TSV
            answer(4, "", "A")]  # the unusable row 4: unknown
    m, matched = score_rows(bench, items, stats, rows)
    assert list(matched.predictions) == ["0"] and matched.n_unknown == 2 and m["n_missing"] == 8


def test_limit_keeps_whole_questions(assets):
    items, stats = MMBench().load(assets, limit=1)
    assert [it.id for it in items] == ["0", "1000000", "2000000", "3000000"]
    assert "1000001" in stats.unscored and stats.n_skipped == 12 - 4


def test_tsv_without_copies(copy_assets):
    # VLMEvalKit scores such a TSV with groups of one row: each question once
    folder = copy_assets("mmbench", "mmbench")
    with open(folder / TSV, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t")]
    with open(folder / TSV, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) < 1_000_000])
    items, stats = MMBench().load(folder)
    assert [it.id for it in items] == ["0", "1", "2"] and any("no circular copies" in n for n in stats.notes)
    assert MMBench().score(items, {"0": "A", "1": "C", "2": "A"})["score"] == pytest.approx(200 / 3)


def test_which_tsv(copy_assets, tmp_path):
    folder = copy_assets("mmbench", "mmbench")
    shutil.copy(folder / TSV, folder / "mmbench_dev_en_20231003.tsv")
    _, stats = MMBench().load(folder)
    assert "mmbench_dev_en_20231003.tsv" in stats.source  # MobileVLM V2's TSV first
    _, stats = MMBench(tsv_name=TSV).load(folder)
    assert stats.source.endswith(TSV)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        MMBench().load(empty)
    assert "mmbench_dev_20230712.tsv" in str(e.value) and "MMBench_DEV_EN.tsv" in str(e.value)


def test_bad_header(tmp_path):
    (tmp_path / TSV).write_text("index\tquestion\n0\tq\n")
    with pytest.raises(DataError, match="lacks column"):
        MMBench().load(tmp_path)


def test_a_repeated_index_is_unusable(copy_assets):
    folder = copy_assets("mmbench", "mmbench")
    lines = (folder / TSV).read_text().splitlines(keepends=True)
    (folder / TSV).write_text("".join(lines) + lines[3])  # row 2 (Q2's original) again
    items, stats = MMBench().load(folder)
    assert len(items) == 9 and stats.n_malformed == 3 + 1 and any("'2' is not a new integer" in m for m in stats.malformed)


@pytest.mark.parametrize("index", ["inf", "-inf"])
def test_an_infinite_index_is_unusable_not_a_crash(copy_assets, index):
    folder = copy_assets("mmbench", "mmbench")
    lines = (folder / TSV).read_text().splitlines(keepends=True)
    (folder / TSV).write_text("".join(lines) + index + lines[3][lines[3].index("\t"):])  # row 2 with index ±inf
    items, stats = MMBench().load(folder)
    assert len(items) == 9 and any(f"{index!r} is not a new integer" in m for m in stats.malformed)
