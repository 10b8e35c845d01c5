"""TextVQA reader (prompt sources) and scorer: LLaVA's eval_textvqa.py matching + m4c_evaluator, by hand."""

import pytest

from alignkd.errors import DataError
from alignkd.eval.benchmarks import TextVQA
from alignkd.eval.benchmarks.textvqa import prompt_question

Q = "Answer the question using a single word or phrase."


def by_image_question(items):
    return {(it.question_id, it.prompt.split("\n")[0]): it for it in items}


def test_prompts_from_llava_file(assets):
    items, stats = TextVQA().load(assets)  # finds textvqa/, which holds LLaVA's prompt file
    assert (stats.n_rows, stats.n_malformed, len(items)) == (5, 1, 4)  # 34606 has 9 answers
    assert "10 strings" in stats.malformed[0]
    q = by_image_question(items)
    # LLaVA's file wins over the Rosetta file (its t2 tokens have an extra "Phone")
    assert q["t2", "what brand is the phone?"].question == (
        "what brand is the phone?\nReference OCR token: NOKIA, 3310, Phone\n" + Q)
    assert q["t1", "how many dogs are on the sign?"].question == (
        "how many dogs are on the sign?\nReference OCR token: \n" + Q)
    assert all(it.question == it.prompt for it in items)
    assert q["t3", "what does the red sign say?"].image.endswith("textvqa/train_images/t3.jpg")


def test_prompts_from_rosetta_then_none(copy_assets):
    folder = copy_assets("textvqa", "textvqa")
    (folder / "llava_textvqa_val_v051_ocr.jsonl").unlink()
    q = by_image_question(TextVQA().load(folder)[0])
    assert q["t2", "what brand is the phone?"].question == "what brand is the phone?\nReference OCR token: NOKIA, 3310\n" + Q
    # images the OCR file does not list still get the (empty) line, as in LLaVA's file
    assert q["t1", "how many dogs are on the sign?"].question == "how many dogs are on the sign?\nReference OCR token: \n" + Q
    (folder / "TextVQA_Rosetta_OCR_v0.2_val.json").unlink()
    items, stats = TextVQA().load(folder)
    assert by_image_question(items)["t2", "what brand is the phone?"].question == "what brand is the phone?\n" + Q
    assert any("not comparable" in n for n in stats.notes)


@pytest.mark.parametrize("file, content", [
    ("llava_textvqa_val_v051_ocr.jsonl", "not json\n{also not\n"),
    ("TextVQA_Rosetta_OCR_v0.2_val.json", "[]"),
    ("TextVQA_Rosetta_OCR_v0.2_val.json", '{"data": {"a": 1}}'),
    ("TextVQA_Rosetta_OCR_v0.2_val.json", '{"data": "abc"}'),
])
def test_an_ocr_file_with_nothing_usable_is_an_error_not_prompts_without_ocr(copy_assets, file, content):
    folder = copy_assets("textvqa", "textvqa")
    if file.startswith("TextVQA"):
        (folder / "llava_textvqa_val_v051_ocr.jsonl").unlink()
    (folder / file).write_text(content)
    with pytest.raises(DataError, match=rf"textvqa: .*{file} holds no"):
        TextVQA().load(folder)


def test_unusable_prompt_lines_are_said(copy_assets):
    folder = copy_assets("textvqa", "textvqa")
    with open(folder / "llava_textvqa_val_v051_ocr.jsonl", "a") as f:
        f.write("not json\n")
    items, stats = TextVQA().load(folder)
    assert len(items) == 4 and stats.n_malformed == 1  # 34606's 9 answers, as before
    assert any(n.startswith("1 unusable line(s) of llava_textvqa_val_v051_ocr.jsonl (e.g. line ") and "not JSON" in n
               for n in stats.notes)


def test_without_ocr(assets):
    items, _ = TextVQA(use_ocr=False).load(assets)
    assert by_image_question(items)["t2", "what brand is the phone?"].question == "what brand is the phone?\n" + Q


@pytest.mark.parametrize("prompt, question", [
    ("What is it?\nAnswer briefly.", "what is it?"),  # 2 lines: line 1
    ("What is it?\nReference OCR token: A, B\nAnswer briefly.", "what is it?"),  # 3 lines with OCR: line 1
    ("Reference OCR token: A\nWhat is it?\nAnswer briefly.", "what is it?"),  # OCR line first: line 2
    ("OCR tokens: A B Question: What is it? Short answer:", "what is it?"),  # the older prompt form
    ("What is it?", None),  # 1 line: eval_textvqa.py asserts
    ("a\nb\nc\nd", None),  # 4 lines
    ("a\nb\nc", None),  # 3 lines without the OCR marker
])
def test_prompt_question_is_eval_textvqa_prompt_processor(prompt, question):
    assert prompt_question(prompt) == question


def test_score(assets, score_rows, answer):
    bench = TextVQA()
    items, stats = bench.load(assets)
    rows = [
        # gold normalised: "2 dogs" x2 ("two dogs", "2 dogs"), "2" x8. "Two dogs." -> "2 dogs": k=2 -> 0.6
        answer("t1", f"how many dogs are on the sign?\nReference OCR token: \n{Q}", "Two dogs."),
        # "nokia" x6 (the nokia, nokia, Nokia, nokia, nokia., NOKIA); "A Nokia" -> "nokia": k=6 -> 1.0.
        # A 2-line prompt without OCR tokens finds the same question (its question line matches).
        answer("t2", f"What brand is the phone?\n{Q}", "A Nokia"),
        # "stop" x3, "stop sign" x7: k=3 -> (3 x 2/3 + 7 x 1) / 10 = 0.9
        answer("t3", "OCR tokens: STOP Question: What does the red sign say? Short answer:", "stop"),
        # "dont" x1 -> "don't"; "don't" stays "don't": k=1 -> 0.3
        answer("t3", f"Reference OCR token: x\nwhat does the small print say?\n{Q}", "don't"),
        answer("t3", "a\nb\nc\nd", "stop"),  # no question in the prompt: unknown
        answer("t9", f"what brand is the phone?\n{Q}", "nokia"),  # no such image: unknown
    ]
    m, matched = score_rows(bench, items, stats, rows)
    assert m["score"] == pytest.approx(100 * (0.6 + 1.0 + 0.9 + 0.3) / 4)  # 70.0
    assert matched.n_unknown == 2 and m["n_missing"] == 0
    # a question without a reply scores 0: the same minus 34605's 0.3, over 4
    m, _ = score_rows(bench, items, stats, rows[:3])
    assert m["score"] == pytest.approx(100 * 2.5 / 4) and m["n_missing"] == 1
