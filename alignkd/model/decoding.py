"""The decode loop, written once: sample a token from the last logits, feed it back, stop at EOS.

`MobileVLM.generate` (batched, PyTorch) and `alignkd.export.runtime.generate` (one prompt through an
exported artifact, as the app steps it) both run it; they differ only in how one step is computed.
"""

from __future__ import annotations

from typing import Callable

import torch


def sample_next_token(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, V) logits → (B,) ids. Greedy when temperature == 0; otherwise softmax(logits/T) with top-p."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


def decode_loop(
    logits: torch.Tensor,
    step: Callable[[torch.Tensor], torch.Tensor],
    max_new_tokens: int,
    eos_id: int | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Decode from `logits` (B, V), the prediction after the prompt; `step(ids)` feeds (B,) new ids and
    returns the (B, V) logits after them. Returns each row's new tokens up to and excluding EOS.

    eos_id None never stops early (speed runs decode exactly max_new_tokens, as llama-bench does).
    `step` is not called after the last token: max_new_tokens tokens cost max_new_tokens − 1 steps.
    `on_logits` sees the logits each token is drawn from.
    """
    b = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    for n in range(max_new_tokens):
        if on_logits is not None:
            on_logits(logits)
        nxt = sample_next_token(logits.float(), temperature, top_p, generator).cpu()  # (B,)
        finished = nxt == eos_id if eos_id is not None else torch.zeros(b, dtype=torch.bool)
        for i in range(b):
            if not done[i] and not finished[i]:
                out[i].append(int(nxt[i]))
        done |= finished
        if bool(done.all()) or n + 1 == max_new_tokens:
            break
        logits = step(nxt)
    return out
