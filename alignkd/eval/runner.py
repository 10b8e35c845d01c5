"""Greedy answers of a model on benchmark items: batched, KV cache, progress bar, resumable answer file.

Answers are appended to a LLaVA-format answer file (`answers.py`) as each batch is done; a rerun
reads the file and skips the questions already answered, so a killed eval resumes where it stopped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data.image import image_config, load_image, preprocess
from ..data.templates import build_prompt
from ..data.tokenize import pad_right, tokenize_prompt
from ..model.mobilevlm import MobileVLM
from .answers import AnswerWriter, match_answers, read_answer_rows
from .benchmarks import EvalItem


def _batches(items: list[EvalItem], size: int) -> Iterable[list[EvalItem]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _question_id(row: Mapping[str, Any]) -> tuple[str, ...]:
    return (str(row["question_id"]),)


def answered(path: Path, items: list[EvalItem],
             answer_keys: Callable[[Mapping[str, Any]], tuple[str, ...]] = _question_id) -> dict[str, str]:
    """{item id: reply} of the items an existing answer file already answers (none if no file)."""
    if not Path(path).is_file():
        return {}
    return match_answers(read_answer_rows(path).rows, {it.id for it in items}, answer_keys).predictions


def model_replies(model: MobileVLM, tokenizer, max_new_tokens: int = 16, template: str = "v1"
                  ) -> Callable[[list[EvalItem]], list[str]]:
    """A batch of items → the model's greedy replies (prompt: template, image token first; batched, KV cache)."""
    model.eval()
    cfg = image_config(model.config)
    device = next(model.parameters()).device
    pad = model.config.text.pad_token_id or 0  # any id: the attention mask hides padding

    @torch.no_grad()
    def reply(batch: list[EvalItem]) -> list[str]:
        ids, mask = pad_right([tokenize_prompt(build_prompt(template, it.question), tokenizer) for it in batch], pad)
        pixels = torch.stack([preprocess(load_image(it.image), cfg) for it in batch])
        ids, mask, pixels = ids.to(device), mask.to(device), pixels.to(device)
        new = model.generate(ids, mask, pixels, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        return [tokenizer.decode(toks, skip_special_tokens=True).strip() for toks in new]

    return reply


def answer_items(model: MobileVLM, tokenizer, items: list[EvalItem], batch_size: int = 16,
                 max_new_tokens: int = 16, template: str = "v1", **kw) -> dict[str, str]:
    """Greedy decoding of every item's prompt (template, image token first) with its image;
    returns {item id: reply}. Keywords: those of `answer_with`."""
    return answer_with(model_replies(model, tokenizer, max_new_tokens, template), items, batch_size, **kw)


def answer_with(reply: Callable[[list[EvalItem]], list[str | None]], items: list[EvalItem], batch_size: int = 16,
                answers_file: Path | None = None, desc: str = "eval", progress: bool = True,
                answer_keys: Callable[[Mapping[str, Any]], tuple[str, ...]] = _question_id,
                model_id: str = "alignkd-mobile", log: Callable[[str], object] = lambda _: None) -> dict[str, str]:
    """{item id: reply} of every item, `reply` answering a batch at a time (a checkpoint's batched decoding, or
    an exported bundle's one question after another; None: the question gets no answer and is scored wrong);
    with answers_file, what it holds is kept and the new replies are appended as each batch is done. `answer_keys` maps an answer-file row to item ids (the
    benchmark's)."""
    out = answered(answers_file, items, answer_keys) if answers_file else {}
    todo = [it for it in items if it.id not in out]
    writer = AnswerWriter(answers_file, model_id) if answers_file and todo else None
    if writer and writer.cut:
        log(f"{desc}: cut the torn last line of {answers_file} ({writer.cut} bytes a killed run left)")
    if out:  # a killed or finished eval of the same weights: its answers are kept, not asked again
        log(f"{desc}: {len(out)} of {len(items)} questions already answered in {answers_file}"
            + (f"; answering the other {len(todo)}" if todo else ""))
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress, leave=False,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    try:
        for batch in _batches(todo, batch_size):
            done = [(it, r) for it, r in zip(batch, reply(batch)) if r is not None]  # None: no answer (wrong)
            out.update((it.id, r) for it, r in done)
            if writer:
                writer.write(done)
            bar.update(len(batch))
    finally:
        bar.close()
        if writer:
            writer.close()
    return out
