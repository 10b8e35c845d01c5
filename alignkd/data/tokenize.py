"""Prompt and training-example tokenization, faithful to MobileVLM.

Inference: `tokenize_prompt` is MobileVLM's `tokenizer_image_token`: split on "<image>", tokenize each
chunk (SentencePiece adds its dummy-prefix space to every chunk), put IMAGE_TOKEN_INDEX between chunks,
one BOS in front.

Training: LLaVA/MobileVLM tokenize the whole conversation at once and then find the answer spans again
with length arithmetic ("len - 2" corrections) that breaks whenever the tokenizer's settings change.
Here the example is tokenized piece by piece instead: each masked prompt piece and each trained answer
piece is encoded on its own and the ids are concatenated. The label boundaries are then exact by
construction, and the first prompt piece is literally `tokenize_prompt(build_prompt(...))`, so the model
trains on the same prefix ids that inference feeds it. Because SentencePiece pre-splits on spaces, the
pieces ("...ASSISTANT:" | " answer" | EOS | "USER: ...") tokenize as the whole string would with the
LLaMA tokenizer as MobileVLM used it (legacy mode: a dummy prefix after "</s>").
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from transformers import PreTrainedTokenizerBase

from alignkd.data.templates import IMAGE_TOKEN, Template, get_template, turn_prompt
from alignkd.model.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from alignkd.errors import ConfigError, DataError

Turn = Union[tuple[str, str], dict[str, str]]
Conversation = Union[tuple[str, str], Sequence[Turn]]

_HUMAN = {"human", "user"}
_GPT = {"gpt", "assistant"}


class SampleTooLongError(DataError):
    """The sample does not fit max_length; the trainer drops such samples and counts them."""


def encode_text(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of plain text, no BOS/EOS, with SentencePiece's dummy prefix, exactly `sp.encode(text)`.

    Special-token strings typed in the text ("</s>") stay text: a user cannot end a turn early, and
    the ids equal what a SentencePiece runtime on a phone produces.
    """
    if not text:
        return []
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (a JSON "\\ud800" escape, bytes decoded with surrogateescape)
        raise DataError(f"text {text[:40]!r} is not valid Unicode: a lone surrogate at character {e.start}") from None
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _encode_with_image(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(encode_text(chunk, tokenizer))
    return ids


def _bos(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.bos_token_id is None:
        raise ConfigError("the tokenizer has no BOS token; MobileVLM prompts start with one")
    return tokenizer.bos_token_id


def _eos(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; v1 answers end with one")
    return tokenizer.eos_token_id


def tokenize_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """MobileVLM's tokenizer_image_token: BOS + chunks joined by IMAGE_TOKEN_INDEX; exactly one BOS."""
    if prompt.count(IMAGE_TOKEN) > 1:
        raise DataError(f"prompt has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN!r} tokens; at most one is supported")
    return [_bos(tokenizer)] + _encode_with_image(prompt, tokenizer)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows → (B, T) int64 ids right-padded with pad_id, and the (B, T) attention mask (1 = real)."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _where(sample_id: Any) -> str:
    return "" if sample_id is None else f"sample {sample_id}: "


def _normalize_turns(conversation: Conversation, sample_id: Any) -> list[tuple[str, str]]:
    """Accept (question, answer), [(role, text), ...] or LLaVA JSON turns; return [(human|gpt, text)]."""
    w = _where(sample_id)
    if isinstance(conversation, tuple) and len(conversation) == 2 and all(isinstance(x, str) for x in conversation):
        return [("human", conversation[0]), ("gpt", conversation[1])]
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise DataError(f"{w}conversation must be (question, answer) or a list of turns, got {type(conversation).__name__}")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversation):
        if isinstance(turn, dict):
            role, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        elif isinstance(turn, (tuple, list)) and len(turn) == 2:
            role, text = turn
        else:
            raise DataError(f"{w}turn {i} must be (role, text) or {{'from': ..., 'value': ...}}, got {turn!r}")
        if not isinstance(role, str) or not isinstance(text, str):
            raise DataError(f"{w}turn {i} needs a string role and text, got {turn!r}")
        r = role.lower()
        if r not in _HUMAN | _GPT:
            raise DataError(f"{w}turn {i} has unknown role {role!r}: expected human/user or gpt/assistant")
        turns.append(("human" if r in _HUMAN else "gpt", text))
    if not turns or len(turns) % 2:
        raise DataError(f"{w}conversation needs alternating human/gpt turns ending with gpt, got {len(turns)} turns")
    for i, (role, _) in enumerate(turns):
        if role != ("human" if i % 2 == 0 else "gpt"):
            raise DataError(f"{w}turn {i} should be {'human' if i % 2 == 0 else 'gpt'}, got {role}")
    return turns


def _check_image_tokens(turns: list[tuple[str, str]], has_image: bool, sample_id: Any) -> None:
    w = _where(sample_id)
    n = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if any(IMAGE_TOKEN in text for role, text in turns if role == "gpt"):
        raise DataError(f"{w}{IMAGE_TOKEN!r} appears in an answer; it belongs in a human turn")
    if has_image and n == 0:
        raise DataError(f"{w}an image is given but the text has no {IMAGE_TOKEN!r}")
    if not has_image and n > 0:
        raise DataError(f"{w}the text has {IMAGE_TOKEN!r} but the sample has no image")
    if n > 1:
        raise DataError(f"{w}the text has {n} {IMAGE_TOKEN!r} tokens; exactly one is supported")


def build_training_example(
    conversation: Conversation,
    template: str | Template,
    tokenizer: PreTrainedTokenizerBase,
    has_image: bool,
    max_length: int,
    num_image_tokens: int = 144,
    sample_id: Any = None,
) -> dict[str, list[int]]:
    """Tokenize one sample into input_ids and labels (prompt and image masked with IGNORE_INDEX).

    v1: turn 1 prompt = "{system} USER: {q1} ASSISTANT:" (with BOS), then " {a1}" + EOS trained, then
        "USER: {q2} ASSISTANT:" masked, " {a2}" + EOS trained, ... As in MobileVLM's
        preprocess_multimodal, the turn holding "<image>" is rewritten "<image>\\n" + rest.strip().
    plain: BOS + "<image>" masked, then caption + "\\n" trained (no EOS); the human text is ignored,
        as in MobileVLM's preprocess_plain.
    The length counts the image token as `num_image_tokens` positions, as the LM sees it; a sample
    over `max_length` raises SampleTooLongError rather than being truncated.
    """
    t = get_template(template)
    w = _where(sample_id)
    turns = _normalize_turns(conversation, sample_id)
    _check_image_tokens(turns, has_image, sample_id)
    turns = [
        (role, IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()) if IMAGE_TOKEN in text else (role, text)
        for role, text in turns
    ]

    if t.name == "plain" and len(turns) != 2:
        raise DataError(f"{w}the plain template takes one (prompt, caption) pair, got {len(turns) // 2} turns")
    pieces: list[tuple[list[int], bool]] = []  # (ids, trained?)
    try:
        if t.name == "plain":
            pieces.append(([_bos(tokenizer)] + ([IMAGE_TOKEN_INDEX] if has_image else []), False))
            pieces.append((encode_text(turns[1][1] + t.sep, tokenizer), True))
        else:
            for k in range(0, len(turns), 2):
                question, answer = turns[k][1], turns[k + 1][1]
                ids = _encode_with_image(turn_prompt(t, question, first=k == 0), tokenizer)
                pieces.append((([_bos(tokenizer)] + ids) if k == 0 else ids, False))
                pieces.append((encode_text(answer, tokenizer) + [_eos(tokenizer)], True))
    except DataError as e:  # the text's own (not valid Unicode): name the sample
        raise DataError(f"{w}{e}") from None

    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in pieces:
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

    n_img = input_ids.count(IMAGE_TOKEN_INDEX)
    length = len(input_ids) + n_img * (num_image_tokens - 1)
    if length > max_length:
        raise SampleTooLongError(
            f"{w}{length} positions (image counted as {num_image_tokens}) exceed max_length {max_length}"
        )
    return {"input_ids": input_ids, "labels": labels}
