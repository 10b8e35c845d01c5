"""POPE reader (release and LLaVA layouts, LLaVA's question ids) and scorer: eval_pope.py, by hand."""

import pytest

from alignkd.errors import DataError
from alignkd.eval.benchmarks import POPE

Q = "Answer the question using a single word or phrase."


def test_llava_layout_and_question_ids(assets):
    items, stats = POPE().load(assets)  # finds pope/coco/ and pope/val2014/
    # 4 + 4 + 6 lines; adversarial has a label "maybe" and a line that is not JSON
    assert (stats.n_rows, stats.n_malformed, len(items)) == (14, 2, 12)
    assert any("'maybe'" in m for m in stats.malformed) and any("not JSON" in m for m in stats.malformed)
    # llava_pope_test.jsonl's order and ids: adversarial + 0, random + 10,000,000, popular + 20,000,000
    assert [it.question_id for it in items] == [1, 2, 3, 4, 10_000_001, 10_000_002, 10_000_003, 10_000_004,
                                               20_000_001, 20_000_002, 20_000_003, 20_000_004]
    first = items[0]
    assert first.id == "1" and first.meta == {"split": "adversarial", "label": "yes"}
    assert first.question == first.prompt == "Is there a dog in the image?\n" + Q
    assert first.image.endswith("pope/val2014/COCO_val2014_000000000042.jpg")


def test_release_layout(copy_assets):
    # POPE's output/coco as it unpacks, with COCO's val2014/ put beside the three files
    folder = copy_assets("pope/coco", "pope")
    copy_assets("pope/val2014", "pope/val2014")
    items, stats = POPE().load(folder)
    assert len(items) == 12 and "release" in stats.source


def test_neither_layout_and_missing_split(tmp_path, copy_assets):
    with pytest.raises(DataError) as e:
        POPE().load(tmp_path)
    assert "coco_pope_{adversarial,random,popular}.json + val2014/" in str(e.value)
    assert "coco/coco_pope_{adversarial,random,popular}.json + val2014/" in str(e.value)
    folder = copy_assets("pope", "p/pope")
    (folder / "coco" / "coco_pope_popular.json").unlink()
    with pytest.raises(DataError, match="coco_pope_popular.json.*JSON lines"):
        POPE().load(folder)


def test_score_follows_eval_pope(assets, score_rows, answer):
    bench = POPE()
    items, stats = bench.load(assets)
    replies = {
        # adversarial, labels yes no no yes
        1: "Yes",                     # yes  TP
        2: "no",                      # no   TN
        3: "No, it is not.",          # "No it is not": no, TN
        4: "I do not see one. Yes.",  # first sentence only: "not" -> no, FN
        # -> acc 3/4 = 75, P = 1/1, R = 1/2, F1 = 2 x 1 x .5 / 1.5 = 66.67, yes-ratio 1/4 = 25
        # random, labels yes no yes no
        10_000_001: "Yes, there is a dog.",            # yes  TP
        10_000_002: "No",                              # no   TN
        10_000_003: "There is no car in the image.",   # no   FN
        10_000_004: "Yes",                             # yes  FP
        # -> acc 2/4 = 50, P = 1/2, R = 1/2, F1 = 50, yes-ratio 2/4 = 50
        # popular, labels yes yes no no
        20_000_001: "yes",            # TP
        20_000_002: "Yes.",           # TP
        20_000_003: "yes",            # FP
        20_000_004: "Not at all.",    # "Not" (capital) is not one of eval_pope's words: yes, FP
        # -> acc 2/4 = 50, P = 2/4, R = 2/2, F1 = 2 x .5 x 1 / 1.5 = 66.67, yes-ratio 4/4 = 100
    }
    rows = [answer(qid, "", text) for qid, text in replies.items()]
    m, _ = score_rows(bench, items, stats, rows)
    assert m["adversarial_precision"] == pytest.approx(100.0) and m["adversarial_recall"] == pytest.approx(50.0)
    assert m["adversarial_accuracy"] == pytest.approx(75.0) and m["adversarial_yes_ratio"] == pytest.approx(25.0)
    assert m["random_f1"] == pytest.approx(50.0)
    assert m["popular_f1"] == pytest.approx(200 / 3) and m["popular_yes_ratio"] == pytest.approx(100.0)
    assert m["score"] == m["f1"] == pytest.approx((200 / 3 + 50 + 200 / 3) / 3)  # 61.11: mean F1 of the splits
    assert m["accuracy"] == pytest.approx((75 + 50 + 50) / 3)
    assert m["yes_ratio"] == pytest.approx((25 + 50 + 100) / 3)
    # without 10,000,001's reply (label yes) the question counts wrong: a false negative. random then:
    # TP 0, TN 1, FN 2, FP 1 -> acc 25, P = 0/1, R = 0/2, F1 0, yes-ratio 1/4
    m, _ = score_rows(bench, items, stats, rows[:4] + rows[5:])
    assert (m["random_f1"], m["random_accuracy"], m["random_yes_ratio"]) == (0.0, 25.0, 25.0)
    assert m["n_missing"] == 1
