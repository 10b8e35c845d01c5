"""Benchmark readers and scorers on the hand-made fixtures in tests/assets/eval (see its README.md).

Every expected score is worked out by hand in the comments next to it.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest

from alignkd.errors import ConfigError, DataError
from alignkd.eval.benchmarks import (
    BENCHMARKS,
    LETTER_PROMPT,
    MME,
    POPE,
    SHORT_ANSWER_PROMPT,
    Benchmark,
    EvalItem,
    MMBench,
    get_benchmark,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "eval"


def by_id(items):
    return {it.id: it for it in items}


def test_registry():
    assert set(BENCHMARKS) == {"easyvqa", "gqa", "sqa", "textvqa", "pope", "mme", "mmbench"}
    for name, b in BENCHMARKS.items():
        assert b.name == name
        assert isinstance(b, Benchmark)
    assert get_benchmark("gqa") is BENCHMARKS["gqa"]
    with pytest.raises(ConfigError, match="unknown benchmark 'vqav2'"):
        get_benchmark("vqav2")


@pytest.mark.parametrize(
    "bench, expected",
    [
        ("gqa", "testdev_balanced_questions.json"),
        ("sqa", "problems.json"),
        ("textvqa", "TextVQA_0.5.1_val.json"),
        ("pope", "coco_pope_random.json"),
        ("mme", "existence"),
        ("mmbench", "mmbench_dev_20230712.tsv"),
    ],
)
def test_missing_files_name_expected_path(tmp_path, bench, expected):
    with pytest.raises(DataError) as e:
        BENCHMARKS[bench].load(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / expected) in msg
    assert bench in msg


def test_pope_missing_one_split_is_an_error(tmp_path):
    shutil.copytree(ASSETS / "pope", tmp_path / "pope")
    (tmp_path / "pope" / "coco_pope_popular.json").unlink()
    with pytest.raises(DataError, match="coco_pope_popular.json.*JSON lines"):
        BENCHMARKS["pope"].load(tmp_path / "pope")


# ------------------------------------------------------------------------------------------ GQA


def test_gqa():
    items, stats = BENCHMARKS["gqa"].load(ASSETS / "gqa")
    # 6 entries: image n4 missing, one without an answer -> 2 malformed, 4 items
    assert (stats.n_rows, stats.n_malformed, len(items)) == (6, 2, 4)
    assert any("n4.jpg" in m for m in stats.malformed)
    assert any("answer" in m for m in stats.malformed)
    it = by_id(items)["201307251"]
    assert it.question == "What color is the ball?\n" + SHORT_ANSWER_PROMPT
    assert it.image.endswith("images/n1.jpg") and Path(it.image).is_file()
    preds = {
        "201307251": "Red.",  # -> "red"  right
        "201307252": "Yes",  # -> "yes"  right
        "201307253": "a dog",  # -> "a dog" != "dog": GQA keeps articles, wrong
        "201307254": "Blue",  # right
    }
    m = BENCHMARKS["gqa"].score(items, preds)
    assert m["score"] == pytest.approx(75.0)  # 3 / 4
    assert m["accuracy_query"] == pytest.approx(50.0)  # query: 251 right, 253 wrong
    assert m["accuracy_verify"] == 100.0 and m["accuracy_choose"] == 100.0
    # a missing prediction counts wrong: 2 / 4
    m = BENCHMARKS["gqa"].score(items, {"201307251": "red", "201307252": "yes"})
    assert m["score"] == pytest.approx(50.0) and m["n_missing"] == 2


def test_limit_is_deterministic_and_checked():
    items, stats = BENCHMARKS["gqa"].load(ASSETS / "gqa", limit=2)
    assert [it.id for it in items] == ["201307251", "201307252"]
    assert stats.n_skipped == 4
    with pytest.raises(ConfigError):
        BENCHMARKS["gqa"].load(ASSETS / "gqa", limit=-1)


# ------------------------------------------------------------------------------------------ SQA


def test_sqa():
    items, stats = BENCHMARKS["sqa"].load(ASSETS / "sqa")
    # test split: 101 102 103 104 106 107 108; 104 has no image (skipped, not SQA-I);
    # 106 answer 5 of 2 choices and 107 not in problems.json -> malformed; 105 is val.
    assert sorted(by_id(items)) == ["101", "102", "103", "108"]
    assert (stats.n_rows, stats.n_malformed, stats.n_skipped) == (6, 2, 1)
    assert any(m.startswith("problems.json[107]") for m in stats.malformed)
    assert by_id(items)["102"].question == (
        "Context: Select the best answer.\n"
        "Which property do these three objects have in common?\n"
        "A. shiny\nB. salty\nC. hard\n" + LETTER_PROMPT
    )
    # no hint -> no Context line
    assert by_id(items)["101"].question.startswith("Which of these states is farthest north?\nA. West Virginia\n")
    assert by_id(items)["101"].image.endswith("images/test/101/image.png")
    preds = {
        "101": "A",  # answer 0 -> right
        "102": "C. hard",  # "X. " rule -> C = index 2 -> right
        "103": "B",  # answer is A -> wrong
        "108": "The answer is E.",  # regex -> E = index 4 -> right
    }
    m = BENCHMARKS["sqa"].score(items, preds)
    assert m["score"] == pytest.approx(75.0)  # 3 / 4
    assert m["unparsed_rate"] == 0.0
    # lower-case "a" is not parsed by eval_science_qa -> wrong and unparsed: 2 / 4 right
    m = BENCHMARKS["sqa"].score(items, dict(preds, **{"101": "a"}))
    assert m["score"] == pytest.approx(50.0) and m["unparsed_rate"] == pytest.approx(25.0)


# ------------------------------------------------------------------------------------------ TextVQA


def test_textvqa():
    items, stats = BENCHMARKS["textvqa"].load(ASSETS / "textvqa")
    assert (stats.n_rows, stats.n_malformed, len(items)) == (5, 1, 4)  # 34606 has 9 answers
    assert "10 strings" in stats.malformed[0]
    q = by_id(items)
    # OCR tokens from the Rosetta file for image t2 only
    assert q["34603"].question == (
        "what brand is the phone?\nReference OCR token: NOKIA, 3310\n" + SHORT_ANSWER_PROMPT
    )
    assert q["34602"].question == "how many dogs are on the sign?\n" + SHORT_ANSWER_PROMPT
    preds = {
        # gold normalised: "2 dogs" x2 ("two dogs", "2 dogs"), "2" x8. "Two dogs." -> "2 dogs": k=2 -> 0.6
        "34602": "Two dogs.",
        # gold normalised: "nokia" x6 (the nokia, nokia, Nokia, nokia, nokia., NOKIA); "A Nokia" -> "nokia": 1.0
        "34603": "A Nokia",
        # "stop" x3, "stop sign" x7: k=3 -> 3 x (2/3) + 7 x 1 over 10 = 0.9
        "34604": "stop",
        # "dont" x1 -> "don't"; "don't" stays "don't": k=1 -> 0.3
        "34605": "don't",
    }
    m = BENCHMARKS["textvqa"].score(items, preds)
    assert m["score"] == pytest.approx(100 * (0.6 + 1.0 + 0.9 + 0.3) / 4)  # 70.0
    # without OCR tokens the prompt is the bare question
    from alignkd.eval.benchmarks import TextVQA

    items2, _ = TextVQA(use_ocr=False).load(ASSETS / "textvqa")
    assert by_id(items2)["34603"].question == "what brand is the phone?\n" + SHORT_ANSWER_PROMPT


# ------------------------------------------------------------------------------------------ POPE


def test_pope():
    items, stats = BENCHMARKS["pope"].load(ASSETS / "pope")
    # 4 + 4 + 6 lines; adversarial has a bad label and a non-JSON line
    assert (stats.n_rows, stats.n_malformed, len(items)) == (14, 2, 12)
    assert any("'maybe'" in m for m in stats.malformed)
    assert any("not JSON" in m for m in stats.malformed)
    assert by_id(items)["random/1"].question == "Is there a dog in the image?\n" + SHORT_ANSWER_PROMPT
    preds = {
        # random, labels yes no yes no
        "random/1": "Yes, there is a dog.",  # yes  TP
        "random/2": "No",  # no   TN
        "random/3": "There is no car in the image.",  # no   FN
        "random/4": "Yes",  # yes  FP
        # -> acc 2/4 = 50, P = 1/2, R = 1/2, F1 = 50, yes-ratio 2/4 = 50
        # popular, labels yes yes no no
        "popular/1": "yes",  # TP
        "popular/2": "Yes.",  # TP
        "popular/3": "yes",  # FP
        "popular/4": "Not at all.",  # "Not" (capital) is not a no-word -> yes, FP
        # -> acc 2/4 = 50, P = 2/4, R = 2/2, F1 = 2*.5*1/1.5 = 66.67, yes-ratio 100
        # adversarial, labels yes no no yes
        "adversarial/1": "Yes",  # TP
        "adversarial/2": "no",  # TN
        "adversarial/3": "No, it is not.",  # TN
        "adversarial/4": "I do not see one. Yes.",  # first sentence only -> no, FN
        # -> acc 3/4 = 75, P = 1/1, R = 1/2, F1 = 66.67, yes-ratio 1/4 = 25
    }
    m = BENCHMARKS["pope"].score(items, preds)
    assert m["random_f1"] == pytest.approx(50.0)
    assert m["popular_f1"] == pytest.approx(200 / 3)
    assert m["popular_yes_ratio"] == pytest.approx(100.0)
    assert m["adversarial_precision"] == pytest.approx(100.0)
    assert m["adversarial_recall"] == pytest.approx(50.0)
    assert m["adversarial_accuracy"] == pytest.approx(75.0)
    assert m["adversarial_yes_ratio"] == pytest.approx(25.0)
    assert m["f1"] == pytest.approx((50 + 200 / 3 + 200 / 3) / 3)  # 61.11
    assert m["score"] == m["f1"]
    assert m["accuracy"] == pytest.approx((50 + 50 + 75) / 3)
    assert m["yes_ratio"] == pytest.approx((50 + 100 + 25) / 3)


def test_pope_one_split():
    items, _ = POPE(splits=("random",)).load(ASSETS / "pope")
    assert len(items) == 4 and all(it.meta["split"] == "random" for it in items)


# ------------------------------------------------------------------------------------------ MME

MME_PREDS = {
    # existence: img 6040 Yes/No right right; img 18150 Yes/No -> Yes, Yes: right wrong
    #   acc 3/4 = 75, acc+ 1/2 = 50 -> 125
    "existence/000000006040.jpg#0": "Yes",
    "existence/000000006040.jpg#1": "No",
    "existence/000000018150.jpg#0": "Yes",
    "existence/000000018150.jpg#1": "Yes",
    # count: "Yes." -> yes, "no, there are two" -> no: both right -> 100 + 100 = 200
    "count/000000041180.jpg#0": "Yes.",
    "count/000000041180.jpg#1": "no, there are two",
    # position: Yes/No gold, Yes Yes -> 50 + 0 = 50
    "position/000000057270.png#0": "Yes",
    "position/000000057270.png#1": "Yes",
    # color: "I think yes" -> other (wrong), No right -> 50 + 0 = 50
    "color/000000061418.jpg#0": "I think yes",
    "color/000000061418.jpg#1": "No",
    # OCR: right right -> 200
    "OCR/0001.jpg#0": "yes",
    "OCR/0001.jpg#1": "no",
    # posters: No No on Yes/No -> 50 + 0 = 50
    "posters/tt0048545.jpg#0": "No",
    "posters/tt0048545.jpg#1": "No",
    # celebrity (CRLF file): right right -> 200
    "celebrity/tt0032138_shot_0395_img_0.jpg#0": "Yes",
    "celebrity/tt0032138_shot_0395_img_0.jpg#1": "No",
    # scene: No Yes on Yes/No -> 0 + 0 = 0
    "scene/Places365_val_00000001.jpg#0": "No",
    "scene/Places365_val_00000001.jpg#1": "Yes",
    # landmark: img 0001 right right, img 0002 right wrong -> acc 3/4 = 75, acc+ 1/2 = 50 -> 125
    "landmark/0001.jpg#0": "Yes",
    "landmark/0001.jpg#1": "No",
    "landmark/0002.png#0": "Yes",
    "landmark/0002.png#1": "Yes",
    # artwork: "Yes", "Nope" (-> no) right right -> 200
    "artwork/10002.jpg#0": "Yes",
    "artwork/10002.jpg#1": "Nope",
}
# perception = 125 + 200 + 50 + 50 + 200 + 50 + 200 + 0 + 125 + 200 = 1200


def test_mme():
    items, stats = BENCHMARKS["mme"].load(ASSETS / "mme")
    # 28 lines: scene/Places365_val_00000002.txt has no image (2 malformed); artwork/10003.txt has a
    # line without a tab and a "Maybe" answer (2 malformed)
    assert (stats.n_rows, stats.n_malformed, len(items)) == (28, 4, 24)
    assert set(by_id(items)) == set(MME_PREDS)
    it = by_id(items)["existence/000000006040.jpg#0"]
    assert it.question == "Is there a train in this image? Please answer yes or no.\n" + SHORT_ANSWER_PROMPT
    assert it.image.endswith("existence/000000006040.jpg")
    assert by_id(items)["artwork/10002.jpg#0"].image.endswith("artwork/images/10002.jpg")
    m = BENCHMARKS["mme"].score(items, MME_PREDS)
    assert m["existence_acc"] == pytest.approx(75.0)
    assert m["existence_acc_plus"] == pytest.approx(50.0)
    assert m["existence_score"] == pytest.approx(125.0)
    assert m["color_score"] == pytest.approx(50.0) and m["n_unparsed"] == 1
    assert m["scene_score"] == 0.0
    assert m["landmark_score"] == pytest.approx(125.0)
    assert m["perception"] == pytest.approx(1200.0)
    assert m["score"] == m["perception"]


def test_mme_missing_subtask(tmp_path):
    shutil.copytree(ASSETS / "mme", tmp_path / "mme")
    shutil.rmtree(tmp_path / "mme" / "landmark")
    with pytest.raises(DataError, match="landmark.*questions_answer_YN"):
        BENCHMARKS["mme"].load(tmp_path / "mme")
    items, _ = MME(subtasks=("existence", "count")).load(tmp_path / "mme")
    assert len(items) == 6


# ------------------------------------------------------------------------------------------ MMBench


def test_mmbench_generated_rotations():
    items, stats = BENCHMARKS["mmbench"].load(ASSETS / "mmbench")
    # 5 rows; row 3 answers "E" with 2 options, row 4's image is not base64 -> 2 malformed
    assert (stats.n_rows, stats.n_malformed) == (5, 2)
    # rotations: question 0 has 4 options, 1 has 3, 2 has 2 -> 9 items
    assert len(items) == 9
    q = by_id(items)
    assert isinstance(q["0:0"].image, bytes) and q["0:0"].image[:4] == b"\x89PNG"
    assert q["1:0"].question == (
        "The image shows a simple drawing.\nWhich shape is shown?\n"
        "A. circle\nB. triangle\nC. square\n" + LETTER_PROMPT
    )
    # rotation 1 of question 1 shows triangle, square, circle
    assert q["1:1"].question.endswith("A. triangle\nB. square\nC. circle\n" + LETTER_PROMPT)
    assert q["1:1"].meta["letter_map"] == {"A": "B", "B": "C", "C": "A"}
    assert q["2:0"].question == "Is the square above the circle?\nA. yes\nB. no\n" + LETTER_PROMPT
    preds = {
        # q0, answer A = "red"; shown position of "red" in rotation r: A, D, C, B
        "0:0": "A",
        "0:1": "D",
        "0:2": "C.",
        "0:3": "A",  # wrong (should be B): right in 3 of 4 rotations -> the question counts wrong
        # q1, answer C = "square": rotation 0 C, rotation 1 B, rotation 2 A
        "1:0": "C",
        "1:1": "B. square",
        "1:2": "square",  # option text -> A -> original C, right
        # q2, answer B = "no": rotation 0 B, rotation 1 A
        "2:0": "B",
        "2:1": "B",  # wrong: rotation 1 shows "yes" as B
    }
    m = BENCHMARKS["mmbench"].score(items, preds)
    assert m["score"] == pytest.approx(100 / 3)  # only q1 right in all rotations: 1 / 3
    assert m["vanilla_accuracy"] == pytest.approx(100.0)  # rotation 0 right for all 3
    assert m["cat/attribute_recognition"] == 0.0
    assert m["cat/object_localization"] == 100.0
    assert m["n_questions"] == 3 and m["n_unparsed"] == 0
    # a missing rotation counts wrong too
    m = BENCHMARKS["mmbench"].score(items, {k: v for k, v in preds.items() if k != "1:2"})
    assert m["score"] == 0.0


def test_mmbench_rows_with_circular_copies(tmp_path):
    # An official-style TSV holding the rotated copies itself (index k*1e6 + i, image given by
    # reference to row i): rows are used as they are and grouped by index mod 1e6.
    src = ASSETS / "mmbench" / "mmbench_dev_20230712.tsv"
    with open(src, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    q2 = rows[2]  # "Is the square above the circle?" A yes B no, answer B
    copy = dict(q2, index="1000002", A="no", B="yes", answer="A", image="2")
    out = tmp_path / "mmbench_dev_20230712.tsv"
    with open(out, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows([q2, copy])
    items, stats = MMBench().load(tmp_path)
    assert [it.id for it in items] == ["2:0", "2:1"]
    assert stats.n_malformed == 0 and items[1].image == items[0].image
    assert items[1].question == "Is the square above the circle?\nA. no\nB. yes\n" + LETTER_PROMPT
    assert MMBench().score(items, {"2:0": "B", "2:1": "A"})["score"] == 100.0
    assert MMBench().score(items, {"2:0": "B", "2:1": "B"})["score"] == 0.0


def test_mmbench_bad_header(tmp_path):
    (tmp_path / "mmbench_dev_20230712.tsv").write_text("index\tquestion\n0\tq\n")
    with pytest.raises(DataError, match="lacks column"):
        MMBench().load(tmp_path)


# ------------------------------------------------------------------------------------------ easy-vqa


def test_easyvqa_subset_and_score():
    b = BENCHMARKS["easyvqa"]
    items, stats = b.load(None, limit=6)
    items2, _ = b.load(Path("/nonexistent"), limit=6)
    assert [it.id for it in items] == [it.id for it in items2]  # deterministic, data_root ignored
    assert len(items) == 6 and stats.n_malformed == 0 and stats.n_skipped == stats.n_rows - 6
    assert all(it.question.endswith("\n" + SHORT_ANSWER_PROMPT) and Path(it.image).is_file() for it in items)
    # exact match after lower/strip/punctuation: "Circle." == "circle"
    preds = {it.id: f" {it.meta['answer'].title()}. " for it in items}
    assert b.score(items, preds)["score"] == 100.0
    # half the answers wrong (and not a valid easy-vqa answer)
    for it in items[:3]:
        preds[it.id] = "banana"
    m = b.score(items, preds)
    assert m["score"] == pytest.approx(50.0) and m["valid_answer_rate"] == pytest.approx(50.0)


def test_easyvqa_scorer_without_package():
    items = [EvalItem("0", "x.png", "q", {"answer": "teal"}), EvalItem("1", "y.png", "q", {"answer": "no"})]
    # "TEAL!" -> teal right; "No way" -> "no way" != "no" wrong -> 50
    assert BENCHMARKS["easyvqa"].score(items, {"0": "TEAL!", "1": "No way"})["score"] == pytest.approx(50.0)


def test_fixture_folder_is_small():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 200_000
    json.loads((ASSETS / "sqa" / "problems.json").read_text())  # valid JSON
