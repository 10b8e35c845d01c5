"""Templates and tokenization against expectations built independently with SentencePiece, and against
a re-implementation of MobileVLM's own preprocess_v1 / preprocess_plain (whole-string tokenization with
a legacy slow LLaMA tokenizer, then length arithmetic)."""

from __future__ import annotations

import pytest

from alignkd.data.templates import IMAGE_TOKEN, build_prompt, get_template
from alignkd.model.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from alignkd.data.tokenize import SampleTooLongError, build_training_example, tokenize_prompt
from alignkd.errors import ConfigError, DataError

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


# --- MobileVLM's code paths, re-implemented on SentencePiece -------------------------------------------

def _slow(sp, text: str) -> list[int]:
    """transformers 4.x slow LlamaTokenizer (legacy): BOS, then special tokens split out, each segment
    SentencePiece-encoded with its own dummy prefix."""
    ids = [1]
    for i, part in enumerate(text.split("</s>")):
        if i:
            ids.append(2)
        ids += sp.encode(part)
    return ids


def _tokenizer_image_token(sp, prompt: str) -> list[int]:
    """mobilevlm/utils.py tokenizer_image_token."""
    chunks = [_slow(sp, c) for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == 1:
        offset = 1
        ids.append(chunks[0][0])
    sep = [IMAGE_TOKEN_INDEX] * (offset + 1)
    for x in [e for sub in zip(chunks, [sep] * len(chunks)) for e in sub][:-1]:
        ids.extend(x[offset:])
    return ids


def _mobilevlm_v1(sp, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """mobilevlm/train/train.py preprocess_multimodal + conv v1 get_prompt + preprocess_v1 (has_image)."""
    msgs = []
    for j, (q, a) in enumerate(turns):
        if "<image>" in q:
            q = ("<image>\n" + q.replace("<image>", "").strip()).strip()
        msgs += [("USER", q), ("ASSISTANT", a)]
    seps = [" ", "</s>"]
    conversation = SYSTEM + seps[0]
    for i, (role, message) in enumerate(msgs):
        conversation += role + ": " + message + seps[i % 2]
    input_ids = _tokenizer_image_token(sp, conversation)
    target = list(input_ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:cur] = [IGNORE_INDEX] * cur
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        parts[0] += sep
        round_len = len(_tokenizer_image_token(sp, rou))
        instruction_len = len(_tokenizer_image_token(sp, parts[0])) - 2
        target[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    assert cur == len(input_ids), "MobileVLM would report a tokenization mismatch"
    return input_ids, target


# --- templates ---------------------------------------------------------------------------------------

def test_constants_and_templates():
    assert (IMAGE_TOKEN, IMAGE_TOKEN_INDEX, IGNORE_INDEX) == ("<image>", -200, -100)
    v1 = get_template("v1")
    assert (v1.system, v1.roles, v1.sep, v1.sep2) == (SYSTEM, ("USER", "ASSISTANT"), " ", "</s>")
    assert get_template("plain").sep == "\n"
    with pytest.raises(ConfigError, match="unknown conversation template 'llama_2'"):
        get_template("llama_2")


def test_build_prompt():
    q = "What color is the shape?"
    assert build_prompt("v1", q) == f"{SYSTEM} USER: <image>\n{q} ASSISTANT:"
    assert build_prompt("v1", q, with_image=False) == f"{SYSTEM} USER: {q} ASSISTANT:"
    assert build_prompt("plain", "") == "<image>"
    with pytest.raises(DataError, match="question contains '<image>'"):
        build_prompt("v1", "<image>\nwhat?")


# --- tokenize_prompt -----------------------------------------------------------------------------------

@pytest.mark.parametrize("question", ["What color is the shape?", "  leading spaces", "is 12 > 3?", "ünïcode 你好"])
def test_tokenize_prompt_v1_matches_sentencepiece(tok, sp, question):
    ids = tokenize_prompt(build_prompt("v1", question), tok)
    expected = [1] + sp.encode(SYSTEM + " USER: ") + [-200] + sp.encode(f"\n{question} ASSISTANT:")
    assert ids == expected
    assert ids == _tokenizer_image_token(sp, build_prompt("v1", question))
    assert ids.count(1) == 1 and ids.count(-200) == 1


def test_tokenize_prompt_edge_cases(tok, sp):
    assert tokenize_prompt("<image>", tok) == [1, -200]
    assert tokenize_prompt("no image here", tok) == [1] + sp.encode("no image here")
    assert tokenize_prompt("x</s>y", tok) == [1] + sp.encode("x</s>y")  # typed specials stay text
    with pytest.raises(DataError, match="2 '<image>' tokens"):
        tokenize_prompt("<image><image>", tok)


# --- build_training_example ----------------------------------------------------------------------------

def test_v1_single_turn(tok, sp):
    ex = build_training_example(("<image>\nWhat shape is it?", "circle"), "v1", tok, True, 512)
    prompt = tokenize_prompt(build_prompt("v1", "What shape is it?"), tok)
    answer = sp.encode("circle") + [2]
    assert ex["input_ids"] == prompt + answer  # the prompt is exactly what inference feeds
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert (ex["input_ids"], ex["labels"]) == _mobilevlm_v1(sp, [("<image>\nWhat shape is it?", "circle")])


def test_v1_multi_turn_llava_json(tok, sp):
    conv = [
        {"from": "human", "value": "What is in the picture?\n<image>"},
        {"from": "gpt", "value": "A red circle on a white background."},
        {"from": "human", "value": "Is it big?"},
        {"from": "gpt", "value": "No, it is small."},
        {"from": "human", "value": "How many shapes are there?"},
        {"from": "gpt", "value": "There is 1 shape."},
    ]
    ex = build_training_example(conv, "v1", tok, True, 1024, sample_id="abc")
    turns = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, 6, 2)]
    assert (ex["input_ids"], ex["labels"]) == _mobilevlm_v1(sp, turns)
    # and piece by piece, independently
    p1 = [1] + sp.encode(SYSTEM + " USER: ") + [-200] + sp.encode("\nWhat is in the picture? ASSISTANT:")
    a1 = sp.encode("A red circle on a white background.") + [2]
    p2 = sp.encode("USER: Is it big? ASSISTANT:")
    a2 = sp.encode("No, it is small.") + [2]
    p3 = sp.encode("USER: How many shapes are there? ASSISTANT:")
    a3 = sp.encode("There is 1 shape.") + [2]
    assert ex["input_ids"] == p1 + a1 + p2 + a2 + p3 + a3
    m = [IGNORE_INDEX]
    assert ex["labels"] == m * len(p1) + a1 + m * len(p2) + a2 + m * len(p3) + a3
    # same conversation as (role, text) tuples
    tuples = [(c["from"], c["value"]) for c in conv]
    assert build_training_example(tuples, "v1", tok, True, 1024) == ex


def test_v1_text_only(tok, sp):
    ex = build_training_example([("user", "Hi"), ("assistant", "Hello.")], "v1", tok, False, 256)
    prompt = [1] + sp.encode(SYSTEM + " USER: Hi ASSISTANT:")
    assert ex["input_ids"] == prompt + sp.encode("Hello.") + [2]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + sp.encode("Hello.") + [2]


def test_plain(tok, sp):
    caption = "a red circle"
    ex = build_training_example(("<image>\nDescribe it briefly.", caption), "plain", tok, True, 256)
    assert ex["input_ids"] == [1, -200] + sp.encode(caption + "\n")
    assert ex["labels"] == [IGNORE_INDEX, IGNORE_INDEX] + sp.encode(caption + "\n")
    # MobileVLM's preprocess_plain: tokenizer_image_token("<image>" + caption + "\n"), mask len("<image>" ids)
    full = _tokenizer_image_token(sp, "<image>" + caption + "\n")
    n = len(_tokenizer_image_token(sp, "<image>"))
    assert ex["input_ids"] == full and ex["labels"] == [IGNORE_INDEX] * n + full[n:]


def test_length_counts_image_tokens(tok):
    ex = build_training_example(("<image>\nq?", "yes"), "v1", tok, True, 10_000, num_image_tokens=144)
    exact = len(ex["input_ids"]) + 143
    build_training_example(("<image>\nq?", "yes"), "v1", tok, True, exact, num_image_tokens=144)
    with pytest.raises(SampleTooLongError, match=rf"sample 7: {exact} positions \(image counted as 144\) exceed max_length {exact - 1}"):
        build_training_example(("<image>\nq?", "yes"), "v1", tok, True, exact - 1, num_image_tokens=144, sample_id=7)
    assert issubclass(SampleTooLongError, DataError)


@pytest.mark.parametrize(
    "conv, has_image, message",
    [
        (("What is it?", "a circle"), True, "sample 3: an image is given but the text has no '<image>'"),
        (("<image>\nWhat is it?", "a circle"), False, "sample 3: the text has '<image>' but the sample has no image"),
        (("<image>\n<image> What?", "x"), True, "sample 3: the text has 2 '<image>' tokens; exactly one is supported"),
        ([("human", "<image>\nA?"), ("gpt", "x"), ("human", "<image> B?"), ("gpt", "y")], True, "2 '<image>' tokens"),
        ([("human", "<image>\nA?"), ("gpt", "see <image>")], True, "'<image>' appears in an answer"),
        ([("human", "<image>\nA?")], True, "alternating human/gpt turns ending with gpt, got 1 turns"),
        ([("gpt", "x"), ("human", "<image>\nA?")], True, "turn 0 should be human, got gpt"),
        ([("system", "x"), ("gpt", "y")], True, "turn 0 has unknown role 'system'"),
        ([{"from": "human"}, {"from": "gpt", "value": "y"}], True, "turn 0 needs a string role and text"),
        ("just a string", True, "conversation must be (question, answer) or a list of turns"),
    ],
)
def test_errors(tok, conv, has_image, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")) as e:
        build_training_example(conv, "v1", tok, has_image, 512, sample_id=3)
    assert "sample 3" in str(e.value) and not isinstance(e.value, SampleTooLongError)


def test_plain_needs_one_pair(tok):
    conv = [("human", "<image>"), ("gpt", "a"), ("human", "b"), ("gpt", "c")]
    with pytest.raises(DataError, match="plain template takes one"):
        build_training_example(conv, "plain", tok, True, 512)
