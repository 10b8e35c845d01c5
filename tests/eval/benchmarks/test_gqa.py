"""GQA reader (both layouts) and scorer: LLaVA's convert_gqa_for_eval + GQA's eval.py, by hand."""

import pytest

from alignkd.data.templates import SHORT_ANSWER_PROMPT
from alignkd.errors import DataError
from alignkd.eval.benchmarks import GQA

Q = "Answer the question using a single word or phrase."


def test_llava_layout_from_the_eval_folder(assets):
    items, stats = GQA().load(assets)  # finds gqa/data/testdev_balanced_questions.json
    # 8 entries (201307251..258): 257 is not balanced (skipped: known, not scored) -> 7 rows read;
    # 255's image n4.jpg is missing and 256 has no answer (2 malformed) -> 5 items
    assert (stats.n_rows, stats.n_malformed, stats.n_skipped, len(items)) == (7, 2, 1, 5)
    assert stats.unscored == {"201307257"}
    assert any("n4.jpg" in m for m in stats.malformed) and any("answer" in m for m in stats.malformed)
    assert "LLaVA-1.5" in stats.source
    it = items[0]
    assert (it.id, it.question_id) == ("201307251", "201307251")
    assert it.question == it.prompt == "What color is the ball?\n" + Q == "What color is the ball?\n" + SHORT_ANSWER_PROMPT
    assert it.image.endswith("gqa/data/images/n1.jpg")


def test_release_and_mobilevlm_layout(copy_assets):
    # the release (and MobileVLM's gqa/): the questions file and images/ in one folder
    folder = copy_assets("gqa/data", "gqa")
    items, stats = GQA().load(folder)
    assert len(items) == 5 and "release" in stats.source
    assert items[0].image == str(folder / "images" / "n1.jpg")
    items2, _ = GQA().load(folder.parent)  # the folder holding gqa/
    assert [i.id for i in items2] == [i.id for i in items]


def test_neither_layout_names_both(tmp_path):
    with pytest.raises(DataError) as e:
        GQA().load(tmp_path)
    msg = str(e.value)
    assert "testdev_balanced_questions.json + images/" in msg
    assert "data/testdev_balanced_questions.json + data/images/" in msg
    assert str(tmp_path) in msg and "LLaVA-1.5" in msg


def test_score_follows_convert_gqa_for_eval_and_eval_py(assets, score_rows, answer):
    bench = GQA()
    items, stats = bench.load(assets)
    rows = [
        answer("201307251", "", "Red."),      # rstrip('.').lower() -> "red" == "red": right
        answer("201307252", "", " Yes"),      # no strip: " yes" != "yes": wrong
        answer("201307253", "", "a dog"),     # articles stay: "a dog" != "dog": wrong
        answer("201307254", "", "Blue..."),   # every trailing '.' goes: "blue": right
        # 201307258 (compare, "no") has no answer: wrong, counted as missing
        answer("201307257", "", "no"),        # unbalanced: known, not scored, not unknown
        answer("999", "", "yes"),             # no such question: unknown
    ]
    m, matched = score_rows(bench, items, stats, rows)
    assert m["score"] == m["accuracy"] == pytest.approx(100 * 2 / 5)  # 251, 254 right of 5
    assert m["accuracy_query"] == pytest.approx(50.0)  # query: 251 right, 253 wrong
    assert m["accuracy_verify"] == 0.0 and m["accuracy_choose"] == 100.0 and m["accuracy_compare"] == 0.0
    assert m["open"] == pytest.approx(50.0)  # open = query
    assert m["binary"] == pytest.approx(100 / 3)  # verify 0 + choose 1 + compare 0 of 3
    assert m["n_missing"] == 1
    assert (matched.n_unknown, matched.unknown, matched.n_unscored) == (1, ["999"], 1)


def test_limit(assets):
    items, stats = GQA().load(assets, limit=2)
    assert [it.id for it in items] == ["201307251", "201307252"]
    # the other 6 of the 8 entries are skipped, known but not scored
    assert stats.n_skipped == 6 and "201307258" in stats.unscored
