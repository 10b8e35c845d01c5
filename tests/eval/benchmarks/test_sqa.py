"""ScienceQA-IMG reader and scorer: LLaVA's eval_science_qa.py letter rules, by hand."""

import pytest

from alignkd.errors import DataError
from alignkd.eval.benchmarks import LETTER_PROMPT, ScienceQA


def by_id(items):
    return {it.id: it for it in items}


def test_reader(assets):
    items, stats = ScienceQA().load(assets)  # finds scienceqa/
    # test split: 101 102 103 104 106 107 108; 104 has no image (skipped: not SQA-IMG, known);
    # 106's answer 5 of 2 choices and 107 absent from problems.json -> malformed; 105 is val.
    assert sorted(by_id(items)) == ["101", "102", "103", "108"]
    assert (stats.n_rows, stats.n_malformed, stats.n_skipped) == (6, 2, 1)
    assert stats.unscored == {"104"}
    assert any(m.startswith("problems.json[107]") for m in stats.malformed)
    q = by_id(items)
    assert q["102"].question == (
        "Context: Select the best answer.\n"
        "Which property do these three objects have in common?\n"
        "A. shiny\nB. salty\nC. hard\n" + LETTER_PROMPT
    )
    # no hint -> no Context line
    assert q["101"].question.startswith("Which of these states is farthest north?\nA. West Virginia\n")
    assert q["101"].image.endswith("scienceqa/images/test/101/image.png")
    # model_vqa_science's prompt field: "<image>\n" first, which eval_science_qa.py looks for
    assert q["101"].prompt == "<image>\n" + q["101"].question


@pytest.mark.parametrize("folder", ["sqa", "data/scienceqa"])  # MobileVLM's name; the ScienceQA repository's
def test_other_folder_names(copy_assets, folder):
    dest = copy_assets("scienceqa", f"root/{folder}")
    items, _ = ScienceQA().load(dest.parents[len(folder.split("/")) - 1])
    assert len(items) == 4


def test_neither_layout(tmp_path):
    with pytest.raises(DataError, match=r"problems.json \+ pid_splits.json \+ images/test/\{pid\}/image.png"):
        ScienceQA().load(tmp_path)


def test_score(assets, score_rows, answer):
    bench = ScienceQA()
    items, stats = bench.load(assets)
    rows = [
        answer("101", "", "A"),                 # the whole reply is a letter: A = 0 = answer, right
        answer("102", "", "C. hard"),           # "X. " rule: C = 2 = answer, right
        answer("103", "", "B"),                 # answer is A: wrong
        answer("108", "", "The answer is E."),  # one "The answer is X." match: E = 4, right
        answer("104", "", "A"),                 # text-only question: known, not scored
    ]
    m, matched = score_rows(bench, items, stats, rows)
    assert m["score"] == pytest.approx(75.0) and m["unparsed_rate"] == 0.0  # 3 / 4
    assert (matched.n_unscored, matched.n_unknown) == (1, 0)
    rows = [
        answer("101", "", "a"),        # lower case is no letter: FAILED, wrong
        answer("102", "", "C.hard"),   # no space after the '.': FAILED
        answer("103", "", "The answer is A. The answer is B."),  # two matches: FAILED
        answer("108", "", "E"),        # E is the 5th of 5 choices: index 4 = answer, right
    ]
    m, _ = score_rows(bench, items, stats, rows)
    assert m["score"] == pytest.approx(25.0) and m["unparsed_rate"] == pytest.approx(75.0)
    # 103's "E" would be beyond its 2 choices: index -1 (unparsed), wrong; 101-108 unanswered: wrong
    m, _ = score_rows(bench, items, stats, [answer("103", "", "E")])
    assert m["score"] == 0.0 and m["n_missing"] == 3 and m["unparsed_rate"] == 100.0


@pytest.mark.parametrize("hint", [5, ["a"]])
def test_a_hint_that_is_not_text_is_an_unusable_row(copy_assets, hint):
    import json

    folder = copy_assets("scienceqa", "root/scienceqa")
    problems = json.loads((folder / "problems.json").read_text())
    problems["101"]["hint"] = hint
    (folder / "problems.json").write_text(json.dumps(problems))
    items, stats = ScienceQA().load(folder.parent)
    assert sorted(by_id(items)) == ["102", "103", "108"]
    assert any(m.startswith("problems.json[101]") and f"hint {hint!r} is not text" in m for m in stats.malformed)
