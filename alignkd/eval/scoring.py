"""Answer normalisation and metrics of the benchmarks, as the MobileVLM / LLaVA evaluation scripts do them.

Pure Python, no model. Each function names the public script it follows; where that script has a
quirk that changes scores, the quirk is kept (and said so) so that numbers compare with published ones.

All rates are returned in percent (0-100), like the published tables; MME's scores are in its own
points (each subtask out of 200, perception out of 2000).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence

# --------------------------------------------------------------------------------------------------
# VQA / TextVQA: EvalAI answer processor (LLaVA llava/eval/m4c_evaluator.py, same as the VQA eval kit)
# --------------------------------------------------------------------------------------------------


class EvalAIAnswerProcessor:
    """Normalises a VQA answer exactly as EvalAI's VQA evaluation does (m4c_evaluator.py).

    Lower-case; drop ',' and '?' and split "'s"; punctuation removed or turned into spaces; periods
    not inside numbers removed; number words "zero".."ten" (and "none") to digits; articles dropped;
    contractions restored ("dont" -> "don't").
    """

    CONTRACTIONS = {
        "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
        "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
        "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
        "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
        "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
        "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
        "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
        "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
        "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
        "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
        "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
        "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
        "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
        "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
        "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
        "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
        "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
        "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
        "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
        "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
        "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
        "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
        "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
        "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
        "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
        "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
        "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
        "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
        "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
        "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
        "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
        "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
        "youre": "you're", "youve": "you've",
    }
    NUMBER_MAP = {
        "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
        "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
    }
    ARTICLES = ("a", "an", "the")
    # Both regexes are verbatim from the VQA kit, including the odd "(?!<=\d)" (a negative
    # look-ahead for the text "<=<digit>", not a look-behind): a period is dropped unless a digit
    # follows it, so "2.5" keeps its point and "dogs." loses it.
    PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
    COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
    PUNCTUATIONS = (
        ";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
        ",", "?", "!",
    )

    def word_tokenize(self, word: str) -> str:
        word = word.lower()
        word = word.replace(",", "").replace("?", "").replace("'s", " 's")
        return word.strip()

    def process_punctuation(self, in_text: str) -> str:
        out_text = in_text
        for p in self.PUNCTUATIONS:
            if (p + " " in in_text or " " + p in in_text) or (
                re.search(self.COMMA_STRIP, in_text) is not None
            ):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        # The kit passes re.UNICODE (== 32) as the *count* argument: at most 32 periods are removed.
        out_text = self.PERIOD_STRIP.sub("", out_text, 32)
        return out_text

    def process_digit_article(self, in_text: str) -> str:
        out_text = []
        for word in in_text.lower().split():
            word = self.NUMBER_MAP.get(word, word)
            if word not in self.ARTICLES:
                out_text.append(word)
        for word_id, word in enumerate(out_text):
            if word in self.CONTRACTIONS:
                out_text[word_id] = self.CONTRACTIONS[word]
        return " ".join(out_text)

    def __call__(self, item: str) -> str:
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.process_punctuation(item)
        item = self.process_digit_article(item)
        return item


_EVALAI = EvalAIAnswerProcessor()


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's normalisation of one answer (see `EvalAIAnswerProcessor`)."""
    return _EVALAI(text)


def vqa_answer_scores(raw_answers: Sequence[str]) -> dict[str, float]:
    """Score of every distinct (normalised) answer against the 10 human answers.

    Exactly the official averaging (m4c_evaluator.TextVQAAccuracyEvaluator._compute_answer_scores):
    for each of the 10 annotators, drop that annotator's answer, count how many of the other 9 give
    this answer, take min(count / 3, 1); the score is the mean over the 10 leave-one-out subsets.
    Consequence: an answer given by k of 10 annotators scores k=1: 0.3, k=2: 0.6, k>=3: 0.9 (k=3) and
    1.0 for k>=4.
    """
    answers = [_EVALAI(a) for a in raw_answers]
    gt_answers = list(enumerate(answers))
    scores: dict[str, float] = {}
    for unique_answer in set(answers):
        accs = []
        for gt_answer in gt_answers:
            others = [item for item in gt_answers if item != gt_answer]
            matching = [item for item in others if item[1] == unique_answer]
            accs.append(min(1.0, len(matching) / 3))
        scores[unique_answer] = sum(accs) / len(accs)
    return scores


def vqa_accuracy(prediction: str, raw_answers: Sequence[str]) -> float:
    """Soft VQA accuracy (0..1) of one prediction against its human answers (usually 10)."""
    return vqa_answer_scores(raw_answers).get(_EVALAI(prediction), 0.0)


# --------------------------------------------------------------------------------------------------
# Short answers: GQA and easy-vqa
# --------------------------------------------------------------------------------------------------


def normalize_gqa_answer(text: str) -> str:
    """LLaVA's scripts/convert_gqa_for_eval.py: `text.rstrip('.').lower()` and nothing else (no strip:
    " Yes" stays " yes"); GQA's eval.py then compares it with the gold answer exactly."""
    return text.rstrip(".").lower()


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_short_answer(text: str) -> str:
    """easy-vqa: lower-case, strip, remove ASCII punctuation, squeeze whitespace."""
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


# --------------------------------------------------------------------------------------------------
# POPE (LLaVA llava/eval/eval_pope.py)
# --------------------------------------------------------------------------------------------------


def parse_pope_answer(text: str) -> str:
    """'yes' or 'no' as eval_pope.py decides: keep the text before the first '.', drop commas, split
    on single spaces; 'No', 'not' or 'no' among the words -> 'no', anything else -> 'yes'."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


def pope_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class 'yes') and yes-ratio, in percent.

    `preds` are already-parsed 'yes'/'no'; `labels` are 'yes'/'no' (anything but 'no' is 'yes', as in
    eval_pope.py). A 0/0 ratio is reported as 0 (eval_pope.py would divide by zero).
    """
    if len(preds) != len(labels):
        raise ValueError("preds and labels differ in length")
    p = [0 if x == "no" else 1 for x in preds]
    y = [0 if x == "no" else 1 for x in labels]
    tp = sum(1 for a, b in zip(p, y) if a == 1 and b == 1)
    fp = sum(1 for a, b in zip(p, y) if a == 1 and b == 0)
    tn = sum(1 for a, b in zip(p, y) if a == 0 and b == 0)
    fn = sum(1 for a, b in zip(p, y) if a == 0 and b == 1)
    n = len(p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / n if n else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * sum(p) / n if n else 0.0,
        "n": float(n),
    }


# --------------------------------------------------------------------------------------------------
# MME (the benchmark's eval_tool/calculation.py)
# --------------------------------------------------------------------------------------------------


def parse_mme_answer(text: str) -> str:
    """'yes', 'no' or 'other', as MME's calculation.py: lower-case; exactly 'yes'/'no', else look for
    'yes' then 'no' inside the first 4 characters."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_subtask_metrics(images: Iterable[Sequence[tuple[str, str]]]) -> dict[str, float]:
    """acc, acc+ (percent) and score = acc + acc+ (out of 200) of one MME subtask.

    `images`: per image, its (gold 'yes'/'no', raw prediction) pairs (MME has 2 questions per image).
    acc is over questions; acc+ is the share of images whose questions are all right.
    """
    n_q = n_right = n_img = n_img_right = n_other = 0
    for pairs in images:
        n_img += 1
        all_right = True
        for gold, pred in pairs:
            parsed = parse_mme_answer(pred)
            n_q += 1
            n_other += parsed == "other"
            if parsed == gold.lower():
                n_right += 1
            else:
                all_right = False
        n_img_right += all_right and len(pairs) > 0
    acc = 100.0 * n_right / n_q if n_q else 0.0
    acc_plus = 100.0 * n_img_right / n_img if n_img else 0.0
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n_other": float(n_other)}


# --------------------------------------------------------------------------------------------------
# ScienceQA (LLaVA llava/eval/eval_science_qa.py)
# --------------------------------------------------------------------------------------------------

SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_sqa_letter(text: str, options: Sequence[str] = SQA_OPTIONS) -> str:
    """The option letter eval_science_qa.py reads from a reply, or 'FAILED'.

    In order: the whole reply is a letter ("B"); it starts with a letter and ". " ("B. salty");
    exactly one match of "The answer is X." Anything else fails (no stripping, as the script).
    """
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    res = _SQA_ANSWER_IS.findall(text)
    if len(res) == 1:
        return res[0]
    return "FAILED"


def sqa_pred_index(letter: str, n_choices: int, options: Sequence[str] = SQA_OPTIONS) -> int:
    """Index of the chosen option, -1 when the letter is not one of the first n_choices letters."""
    if letter in options[:n_choices]:
        return list(options).index(letter)
    return -1


# --------------------------------------------------------------------------------------------------
# MMBench: VLMEvalKit's answer extraction with exact matching (vlmeval/utils/matching_util.py at
# e8e78f05: can_infer = can_infer_option, else can_infer_text), the rule its multiple-choice
# evaluation applies when no judge model is used. Run with VLMEvalKit's VERBOSE unset (its default).
# --------------------------------------------------------------------------------------------------

_MC_BLANKED = ".()[],:;!*#{}"  # turned into spaces before the reply is split into words
_MC_REFUSALS = (
    "Sorry, I can't help with images of people yet.", "I can't process this file.",
    "I'm sorry, but without the image provided", "Cannot determine the answer",
)
# No word boundary after the letter, as in VLMEvalKit: "The answer is based on ..." reads as B.
_MC_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option letter a reply names, 'Z' for a refusal, or None.

    Rules, in order: a reply holding VLMEvalKit's API-failure text names nothing; one holding a
    refusal phrase is 'Z' (never right). Blank out `.()[],:;!*#{}` and split into words; if exactly
    one choice letter is a word (case-sensitive: "b" is no letter) and its first occurrence is among
    the last four words, that letter; if no letter is a word but "Z" is, 'Z'. Else the first match
    of "answer is X" / "correct answer is **X**" (any case) whose letter is a choice. Two letters
    ("A or B") name nothing.
    """
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in _MC_REFUSALS):
        return "Z"
    words = answer.translate(str.maketrans(_MC_BLANKED, " " * len(_MC_BLANKED))).split()
    named = [c for c in choices if c in words]
    if len(named) == 1:
        if words.index(named[0]) > len(words) - 5:
            return named[0]
    elif not named and "Z" in words:
        return "Z"
    m = _MC_ANSWER_IS.search(answer)
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option whose text (lower-case) is a substring of the reply (lower-case), when exactly
    one is; None when none or several are, or when the reply is longer than twice the options'
    texts together."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's exact-matching extraction: the letter (or 'Z'), else the option text, else None.
    `choices` maps each option letter of the question to its text."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def percent(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0
