"""Logit KD from a teacher's top-k log-probabilities (an offline teacher cache) instead of its full logits.

A cache keeps, per KD position, the teacher's k largest log-probs at temperature T and their token ids.
The rest of the vocabulary is unknown, so the KL must be taken over a smaller distribution. Two ways:

- "rest" (default): k + 1 buckets — the k cached tokens and one bucket holding the teacher's remaining
  mass (1 − Σ top-k); the student's bucket is its probability of every other token. It is a true KL
  between coarsened distributions: ≥ 0, zero iff the student matches the teacher on the k tokens and on
  the tail mass, and it still tells the student how much mass to leave outside the top k.
- "renorm": both sides renormalised over the k cached tokens. It ignores how much mass the student puts
  outside the k tokens.

With k equal to the vocabulary both are exactly the full-logit KL of `kd_loss`. The recipe's default is
"rest", chosen by measurement (benchmarks/topk_tail.py, README Results): on the demo's teacher and
students its gradient points where full KD's does, at k = 8 and 32 and at temperature 1 and 2, while
renorm's drifts away, the more the larger the teacher's mass outside the top k (higher temperature,
smaller k), because a renormalised student is never told to take mass off the other tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkd.errors import ConfigError

TAILS = ("rest", "renorm")
_LOG_MIN_MASS = -27.631021115928547  # log(1e-12)


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(M, V) teacher logits → ((M, k) log-probs at temperature T, (M, k) token ids), largest first."""
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (M, V)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (M, k)
    return values, ids


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate on both ends (Mächler's split at −ln 2)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_kd_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_ids: Tensor,
    temperature: float = 1.0,
    tail: str = "rest",
    student_logp: Tensor | None = None,
) -> Tensor:
    """KL(teacher ‖ student) over the cached top-k (+ tail) at the M KD positions, mean over positions, × T².

    student_logits (M, V) at the KD positions (in the order the cache stores them); teacher_logprobs and
    teacher_ids (M, k) from `teacher_topk` (log-probs at the same temperature). student_logp: the student's
    log-probs at T when the caller has them (CE's at T = 1), not computed again.
    """
    if tail not in TAILS:
        raise ConfigError(f"tail must be one of {TAILS}, got {tail!r}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1) if student_logp is None else student_logp  # (M, V)
    s_sel = s_logp.gather(-1, teacher_ids.long())  # (M, k)
    t_sel = teacher_logprobs.float()  # (M, k)
    if tail == "renorm":
        t_sel = t_sel - t_sel.logsumexp(-1, keepdim=True)
        s_sel = s_sel - s_sel.logsumexp(-1, keepdim=True)
        kl = (t_sel.exp() * (t_sel - s_sel)).sum(-1)  # (M,)
    else:
        kl = (t_sel.exp() * (t_sel - s_sel)).sum(-1)  # (M,) the k cached buckets
        if t_sel.shape[-1] < s_logp.shape[-1]:  # k = V has no tail (its mass would be rounding noise)
            # log of the mass outside the top k; a mass that rounds to 0 is taken as _MIN_MASS, not log 0
            t_rest = _log1mexp(t_sel.logsumexp(-1)).clamp(min=_LOG_MIN_MASS)  # (M,)
            s_rest = _log1mexp(s_sel.logsumexp(-1)).clamp(min=_LOG_MIN_MASS)  # (M,)
            kl = kl + t_rest.exp() * (t_rest - s_rest)
    return kl.mean() * temperature**2
