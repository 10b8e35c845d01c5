"""Greedy answers of a model on benchmark items: batched, KV cache, progress bar, resumable JSONL.

Each answer is appended to the JSONL file as soon as its batch is done; a rerun reads the file and
skips the items already answered, so a killed eval resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from ..data.image import image_config, load_image, preprocess
from ..data.templates import build_prompt
from ..data.tokenize import tokenize_prompt
from ..model.mobilevlm import MobileVLM
from .benchmarks import EvalItem


def _batches(items: list[EvalItem], size: int) -> Iterable[list[EvalItem]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def read_answers(path: Path) -> dict[str, str]:
    """Answers already in a JSONL file; a torn last line (killed mid-write) is ignored."""
    done: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[str(row["id"])] = row["answer"]
    return done


@torch.no_grad()
def answer_items(model: MobileVLM, tokenizer, items: list[EvalItem], batch_size: int = 16,
                 max_new_tokens: int = 16, template: str = "v1", answers_file: Path | None = None,
                 desc: str = "eval", progress: bool = True) -> dict[str, str]:
    """Greedy decoding of every item's v1 prompt with its image; returns {item id: answer}."""
    model.eval()
    cfg = image_config(model.config)
    done = read_answers(answers_file) if answers_file else {}
    todo = [it for it in items if it.id not in done]
    out = dict(done)
    pad = model.config.text.pad_token_id
    sink = None
    if answers_file:
        answers_file.parent.mkdir(parents=True, exist_ok=True)
        sink = open(answers_file, "a")
    try:
        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress, leave=False,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)
        for batch in _batches(todo, batch_size):
            prompts = [tokenize_prompt(build_prompt(template, it.question), tokenizer) for it in batch]
            t = max(len(p) for p in prompts)
            ids = torch.full((len(batch), t), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):
                ids[i, :len(p)] = torch.tensor(p)
                mask[i, :len(p)] = 1
            pixels = torch.stack([preprocess(load_image(it.image), cfg) for it in batch])
            new = model.generate(ids, mask, pixels, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id)
            for it, toks in zip(batch, new):
                ans = tokenizer.decode(toks, skip_special_tokens=True).strip()
                out[it.id] = ans
                if sink:
                    sink.write(json.dumps({"id": it.id, "answer": ans}) + "\n")
            if sink:
                sink.flush()
                os.fsync(sink.fileno())
            bar.update(len(batch))
        bar.close()
    finally:
        if sink:
            sink.close()
    return out
