"""Unit tests of the answer parsers and metrics in alignkd.eval.scoring (expected values by hand)."""

import pytest

from alignkd.eval import scoring

# ------------------------------------------------------------------------------ VQA normalisation


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two dogs.", "2 dogs"),  # lower-case, period dropped (no digit after it), two -> 2
        ("2 dogs", "2 dogs"),
        ("The Nokia", "nokia"),  # article dropped
        ("an apple", "apple"),
        ("nokia.", "nokia"),
        ("2.5", "2.5"),  # a period followed by a digit stays
        ("dont", "don't"),  # contraction restored
        ("10,000", "10000"),  # commas removed by word_tokenize
        ("one-way", "1 way"),  # '-' becomes a space (no ' -'/'- '), then one -> 1
        ("yes!", "yes"),
        ("none", "0"),  # "none" is a number word in the kit
        ("  Stop\tSign ", "stop sign"),
        ("the man's hat", "man 's hat"),  # "'s" split off
    ],
)
def test_evalai_normalisation(raw, norm):
    assert scoring.normalize_vqa_answer(raw) == norm


def test_vqa_leave_one_out_averaging():
    # An answer given by k of the 10 annotators: mean over the 10 leave-one-out subsets of
    # min(matches among the other 9 / 3, 1):
    # k=1: 1 subset with 0 matches (0), 9 subsets with 1 match (1/3) -> 9/30 = 0.3
    # k=2: 2 x (1/3) + 8 x (2/3) -> (2/3 + 16/3) / 10 = 0.6
    # k=3: 3 x (2/3) + 7 x 1 -> (2 + 7) / 10 = 0.9   (not 1.0, as a naive min(3/3, 1) would say)
    # k=4: 4 x 1 + 6 x 1 -> 1.0
    for k, expected in ((1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        answers = ["cat"] * k + ["dog"] * (10 - k)
        assert scoring.vqa_accuracy("cat", answers) == pytest.approx(expected)
    assert scoring.vqa_accuracy("bird", ["cat"] * 10) == 0.0


def test_vqa_accuracy_normalises_both_sides():
    # gold: "two dogs" and "2 dogs" both normalise to "2 dogs" (k=2), eight "2"s.
    answers = ["two dogs", "2 dogs"] + ["2"] * 8
    assert scoring.vqa_accuracy("Two dogs.", answers) == pytest.approx(0.6)
    # "2" is given by 8 annotators -> 1.0; "two" normalises to "2" too
    assert scoring.vqa_accuracy("two", answers) == pytest.approx(1.0)


# ------------------------------------------------------------------------------ GQA / easy-vqa


def test_gqa_normalisation():
    # convert_gqa_for_eval.py: rstrip('.').lower() and nothing else
    assert scoring.normalize_gqa_answer("Red.") == "red"
    assert scoring.normalize_gqa_answer("Blue...") == "blue"
    assert scoring.normalize_gqa_answer(" Yes") == " yes"  # no strip
    assert scoring.normalize_gqa_answer("Yes. ") == "yes. "  # the space protects the period
    assert scoring.normalize_gqa_answer("a dog") == "a dog"  # no article stripping in GQA


def test_short_answer_normalisation():
    assert scoring.normalize_short_answer("  Circle! ") == "circle"
    assert scoring.normalize_short_answer("Yes.") == "yes"


# ------------------------------------------------------------------------------ POPE


@pytest.mark.parametrize(
    "reply, parsed",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("Yes, there is a dog.", "yes"),
        ("There is no dog in the image.", "no"),
        ("Not at all.", "yes"),  # quirk of eval_pope.py: capitalised "Not" is not in its word list
        ("I do not see one. Yes.", "no"),  # only the first sentence counts
        ("Yes. There is no cat.", "yes"),
        ("No,", "no"),  # comma removed before splitting
        ("", "yes"),
    ],
)
def test_pope_parse(reply, parsed):
    assert scoring.parse_pope_answer(reply) == parsed


def test_pope_metrics_by_hand():
    # preds:  yes yes yes no  no
    # labels: yes no  yes yes no   -> TP 2, FP 1, FN 1, TN 1
    m = scoring.pope_metrics(["yes", "yes", "yes", "no", "no"], ["yes", "no", "yes", "yes", "no"])
    assert m["accuracy"] == pytest.approx(60.0)  # (2 + 1) / 5
    assert m["precision"] == pytest.approx(200 / 3)  # 2 / 3
    assert m["recall"] == pytest.approx(200 / 3)  # 2 / 3
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == pytest.approx(60.0)  # 3 of 5 replies are yes
    # all "no": no positive predictions -> precision 0/0 reported as 0, F1 0
    m = scoring.pope_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 50.0 and m["yes_ratio"] == 0.0


# ------------------------------------------------------------------------------ MME


@pytest.mark.parametrize(
    "reply, parsed",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),  # 'yes' in first 4 chars
        ("No, it is not.", "no"),
        ("nope", "no"),
        ("I think yes", "other"),  # first 4 chars "i th"
        ("Not sure", "no"),  # "not " holds "no"
        ("", "other"),
    ],
)
def test_mme_parse(reply, parsed):
    assert scoring.parse_mme_answer(reply) == parsed


def test_mme_acc_plus():
    # image 1: both right; image 2: one right; image 3: none right ("maybe" -> other)
    # acc = 3/6 = 50, acc+ = 1/3 = 33.33, score = 83.33
    m = scoring.mme_subtask_metrics(
        [
            [("yes", "Yes"), ("no", "No")],
            [("yes", "Yes"), ("no", "Yes")],
            [("yes", "maybe"), ("no", "yes")],
        ]
    )
    assert m["acc"] == pytest.approx(50.0)
    assert m["acc_plus"] == pytest.approx(100 / 3)
    assert m["score"] == pytest.approx(50 + 100 / 3)
    assert m["n_other"] == 1


# ------------------------------------------------------------------------------ ScienceQA


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("A", "A"),
        ("C. hard", "C"),  # letter + ". "
        ("The answer is B.", "B"),
        ("I think The answer is D, surely", "D"),  # the regex's '.' matches any character
        ("a", "FAILED"),  # lower-case is not an option
        ("A.", "FAILED"),  # too short for the "X. " rule, no "The answer is"
        ("(A)", "FAILED"),
        (" A", "FAILED"),  # eval_science_qa.py does not strip
        ("The answer is A. The answer is B.", "FAILED"),  # two matches
    ],
)
def test_sqa_letter(reply, letter):
    assert scoring.parse_sqa_letter(reply) == letter


def test_sqa_pred_index():
    assert scoring.sqa_pred_index("B", 2) == 1
    assert scoring.sqa_pred_index("C", 2) == -1  # only A, B exist for 2 choices
    assert scoring.sqa_pred_index("FAILED", 4) == -1


# ------------------------------------------------------------------------------ MMBench (VLMEvalKit can_infer)

OPTIONS = {"A": "circle", "B": "triangle", "C": "square"}


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("B", "B"),
        ("B.", "B"),  # '.' is blanked out before the split
        ("(C)", "C"),
        ("C) square", "C"),
        ("**C**", "C"),  # '*' blanked
        ("Answer: [B]", "B"),
        ("The answer is B", "B"),  # one letter, and it is among the last 4 words
        ("A cat", "A"),  # the article "A" is a letter word (VLMEvalKit's VERBOSE check is off)
        ("A cat sits on the mat", None),  # "A" is the 1st of 6 words: not among the last 4
        ("B is right since the shape has three sides", None),  # B is the 1st of 9 words: not in the last 4;
        # no "answer is"; the reply is longer than 2 x 20 characters: no text match
        ("I think the answer is B because it has corners", "B"),  # B not in the last 4 words; "answer is B"
        ("Correct answer is **b**", "B"),  # "answer is b" in any case, stars allowed
        ("The answer is based on shape", "B"),  # "answer is b..." with no word boundary
        ("b", None),  # lower case is no letter, and "b" holds no option text
        ("A or B", None),  # two letters
        ("E", None),  # not an option letter; no option text in it
        ("Z", "Z"),  # no option letter, but a lone Z
        ("Cannot determine the answer", "Z"),  # a refusal phrase
        ("Failed to obtain answer via API. square", "C"),  # no letter then; the text rule finds "square"
        ("square", "C"),  # option text in the reply
        ("It is a Square.", "C"),  # lower-cased substring
        ("a circle or a square", None),  # two option texts
        ("", None),
    ],
)
def test_can_infer(reply, letter):
    assert scoring.can_infer(reply, dict(OPTIONS)) == letter


def test_can_infer_text_length_limit():
    # 2 x (len("yes") + len("no")) = 10 characters at most
    assert scoring.can_infer_text("it is yes!", {"A": "yes", "B": "no"}) == "A"  # 10 characters
    assert scoring.can_infer_text("it is yes!!", {"A": "yes", "B": "no"}) is None  # 11
    # "no" is a substring of "not": both texts in "not yes" -> none
    assert scoring.can_infer_text("not yes", {"A": "yes", "B": "no"}) is None
