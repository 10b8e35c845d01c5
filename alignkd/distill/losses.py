"""Align-KD losses (DESIGN.md §2): CE + λ_kd·KD + λ_att·L_att + λ_v·(V-all + V-focus).

Token layout shared by teacher and student (same tokenizer and template): B samples of length T, right
padded, at most one image per sample spliced in as N contiguous vision tokens anywhere in the sequence.

variant="paper" (default) is the method as the paper describes it:
  * L_att: layer-0 post-softmax attention, block of TEXT-query rows × VISION-key columns. Under the
    causal mask only text *after* the image can see it, so the rows are the real text tokens after the
    image span. The teacher's heads are mapped onto the student's by a learned 1×1 conv (HeadAdapter);
    MSE over the valid rows.
  * L_v: a learned per-token Linear (VisionAdapter) maps the teacher's projector output onto the
    student's; MSE over all N tokens (V-all) + MSE over the top-k vision tokens that the teacher's text
    rows attend to most (V-focus).
  * KD: forward KL(teacher ‖ student) on answer positions (labels != -100).

variant="release" reproduces fqhank/Align-KD (trainer.py / mobilellama.py / mobilevlm.py at HEAD) for
ablation; each difference:
  1. its t-v mask is vision ROWS × text COLUMNS (vision_mask on rows, text_mask on columns). A vision
     query never sees a later text key under the causal mask, so the student's block is exactly 0 and
     L_att sends no gradient into the LM. Its value is not 0: the head adapter's bias is a constant
     offset (L_att = mean of bias² over the block). The release also assumes the image at position 1
     (`plain` template); here the real span of each sample is used.
  2. the adapters are built in the Trainer, outside the model, and never reach the optimizer: random
     init, never updated. Here they are frozen (requires_grad False).
  3. focus top-k runs over ALL key positions (BOS sink included) of the head-averaged teacher map summed
     over query rows, then shifts indices by a fixed 2 (its test on column 1 gives 2 whenever the image
     is at 1): feature = key - 2, one off, negative indices wrapping to the end. Here: feature =
     (key - start - 1) mod N, the same for start = 1; where the release would index out of range (text
     keys) the modulo wraps. The release sums over every query row, padding rows too; here only real
     rows count, so padding never changes the loss.
  4. KD averages over every position, image and padding included (kd_positions resolves to "all").
  5. (not reproduced) everything in fp16 with eager attention and attentions on every layer; here
     layer 0 is captured with a hook (alignkd.distill.attention) and losses are computed in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from alignkd.distill.topk import TAILS, teacher_topk, topk_kd_loss
from alignkd.errors import ConfigError
from alignkd.model.config import IGNORE_INDEX

KD_POSITIONS = ("text", "tokens", "all")
LOSS_TERMS = ("ce", "kd", "att", "v_all", "v_focus", "total")  # what AlignKDLoss returns, in this order
VARIANTS = ("paper", "release")
# KD temperatures in use are 1-20; T² overflows a float at ~1e154 (an OverflowError at step 1 before this bound)
MAX_TEMPERATURE = 1e4


# ----------------------------------------------------------------------------- logits terms

def scored_rows(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of x (B, T, ...) where mask (B, T) is True, in row-major order, and their flat indices b·T + t
    (M,). An index_select: its backward is one index_add, where a boolean-mask index's sorts the indices and
    accumulates into a (B, T, V) copy (a few ms a step at real shapes on a GPU)."""
    if tuple(x.shape[:2]) != tuple(mask.shape):  # flat indices would read other rows without an error
        raise ConfigError(f"logits of shape {tuple(x.shape)} do not match the (B, T) = {tuple(mask.shape)} of the labels")
    idx = mask.reshape(-1).nonzero().squeeze(1)  # (M,)
    return x.reshape(-1, *x.shape[2:]).index_select(0, idx), idx


def _ce_from_logp(logp: Tensor, labels: Tensor, idx: Tensor, logits: Tensor) -> Tensor:
    """CE from the log-probs (M, V) of the rows `idx` (b·T + t) of `scored_rows`: row t predicts label t+1."""
    if logp.shape[0] == 0:
        return logits.sum() * 0.0  # no target in the batch: a zero that still backpropagates
    return F.nll_loss(logp, labels.reshape(-1)[idx + 1])


def ce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy: logits[:, :-1] predict labels[:, 1:], -100 ignored, mean over targets."""
    picked, idx = scored_rows(logits, kd_positions_mask(labels, None, "text"))  # (M, V): no (B, T, V) fp32 copy
    return _ce_from_logp(F.log_softmax(picked.float(), dim=-1), labels, idx, logits)


def kd_positions_mask(labels: Tensor, attention_mask: Tensor | None, positions: str) -> Tensor:
    """(B, T) bool: the logit positions that KD scores (see `kd_loss`)."""
    if positions == "text":
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts label t+1, as in CE
        return mask
    if positions == "tokens":
        return attention_mask.bool()
    if positions == "all":
        return torch.ones_like(labels, dtype=torch.bool)
    raise ConfigError(f"kd_positions must be one of {', '.join(KD_POSITIONS)}, got {positions!r}")


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
    positions: str = "text",
) -> Tensor:
    """Forward KL(teacher ‖ student) of the next-token distributions, mean over positions, × T².

    KL = CE(teacher probs, student log-probs) − H(teacher): same gradient as the release's CE, but 0
    when the student matches. Scaled by temperature² (Hinton) so the gradient size does not depend on T.

    positions:
      "text"   (default) answer positions, labels != -100 shifted as in CE: the tokens the student is
               trained to produce. Prompt, image and padding positions carry no target, and the
               teacher's distribution there (e.g. over the next vision token) is not meaningful.
      "tokens" every real token (attention_mask == 1), prompt and image positions included.
      "all"    every position, image and padding included, as the public release does.
    """
    s, idx = scored_rows(student_logits, kd_positions_mask(labels, attention_mask, positions))  # (M, V)
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = _teacher_rows(teacher_logits, idx, student_logits.shape)  # (M, V)
    return _full_kl(F.log_softmax(s.float() / temperature, dim=-1), t, temperature)


def _teacher_rows(teacher_logits: Tensor, idx: Tensor, like: tuple[int, ...]) -> Tensor:
    """The teacher's rows `idx` (b·T + t) of its (B, T, V) logits, which must have the student's (B, T, V)."""
    if tuple(teacher_logits.shape) != tuple(like):
        raise ConfigError(f"teacher logits of shape {tuple(teacher_logits.shape)} do not match the student's {tuple(like)}")
    return teacher_logits.reshape(-1, teacher_logits.shape[-1]).index_select(0, idx)


def _full_kl(s_logp: Tensor, t_rows: Tensor, temperature: float) -> Tensor:
    """KL(teacher ‖ student) × T² from the student's log-probs (M, V) at T and the teacher's logits (M, V) at
    the same positions."""
    t_logp = F.log_softmax(t_rows.float() / temperature, dim=-1)  # (M, V)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (M,)
    return kl.mean() * temperature**2


# ----------------------------------------------------------------------------- blocks

@dataclass
class ImageSpans:
    """Where each image sits: `batch` (B_img,) sample indices, `start` (B_img,) first vision position."""

    batch: Tensor
    start: Tensor
    n_tokens: int
    common_start: int | None = None  # the one first vision position of every image, when they share it


def image_spans(image_mask: Tensor) -> ImageSpans:
    """Locate the one contiguous span of N vision tokens in each sample that has one."""
    image_mask = image_mask.bool()
    counts = image_mask.sum(1)  # (B,)
    batch = counts.nonzero().squeeze(1)  # (B_img,)
    if batch.numel() == 0:
        return ImageSpans(batch, batch.clone(), 0)
    n = int(counts[batch[0]])
    if bool((counts[batch] != n).any()):
        raise ConfigError(f"every image must have the same number of vision tokens, got {counts[batch].tolist()}")
    m = image_mask[batch]  # (B_img, T)
    start = m.int().argmax(1)  # (B_img,) first True
    last = m.shape[1] - 1 - m.flip(1).int().argmax(1)
    if bool((last - start + 1 != n).any()):
        raise ConfigError("image_mask must mark one contiguous span of vision tokens per sample")
    lo, hi = torch.stack([start.min(), start.max()]).tolist()
    return ImageSpans(batch, start, n, lo if lo == hi else None)


def _text_after_image(spans: ImageSpans, attention_mask: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """The positions after each sample's image, end .. end + T − min(end) − 1 (end = first position after the
    span), clamped into the sequence, and which of them are real tokens: (B_img, T − min(end)) each."""
    end = spans.start + spans.n_tokens  # (B_img,)
    pos = end[:, None] + torch.arange(T - int(end.min()), device=end.device)  # (B_img, T_t)
    in_seq = pos < T
    pos = pos.clamp(max=T - 1)
    return pos, in_seq & attention_mask[spans.batch].bool().gather(1, pos)


def _no_block(probs: Tensor) -> tuple[Tensor, Tensor]:
    """The empty block and mask of a batch without images."""
    return probs.new_zeros(0, probs.shape[1], 0, 0), torch.zeros(0, 0, dtype=torch.bool, device=probs.device)


def text_vision_block(
    probs: Tensor, image_mask: Tensor, attention_mask: Tensor, query_offset: int = 0, spans: ImageSpans | None = None
) -> tuple[Tensor, Tensor]:
    """Text-query × vision-key block of layer-0 attention, for the samples that have an image.

    probs: (B, H, T_p, T) post-softmax attention; row r is query position r + query_offset (the
    capture can skip rows before `query_from`). Under the causal mask only text AFTER the image span
    can attend to it, so the rows are positions end, end+1, ... (end = first position after the image),
    kept where attention_mask is 1; the columns are the sample's N vision positions.

    Returns block (B_img, H, T_q, N) with T_q = T - min(end), and row_mask (B_img, T_q) bool. Invalid
    rows (padding, past the sequence) are zeroed in the block.
    """
    B, H, T_p, T = probs.shape
    spans = image_spans(image_mask) if spans is None else spans  # the caller may have it already
    if spans.batch.numel() == 0:
        return _no_block(probs)
    n = spans.n_tokens
    if (first := int((spans.start + n).min())) < query_offset:
        raise ConfigError(f"attention rows start at {query_offset} but text after an image starts at {first}")
    pos, row_mask = _text_after_image(spans, attention_mask, T)  # (B_img, T_q) query positions
    if spans.common_start is not None and spans.batch.numel() == B:
        # every sample's image at one place (one prompt template): the block is a slice, whose backward is a
        # copy, not the gather's scatter into a (B, H, T_p, T) copy of the map
        s0 = spans.common_start
        block = probs[:, :, first - query_offset:, s0:s0 + n]  # (B, H, T_q, N)
    else:
        cols = spans.start[:, None] + torch.arange(n, device=probs.device)  # (B_img, N)
        # one advanced-index gather; the advanced dims go first because a slice separates them
        block = probs[spans.batch[:, None, None], :, (pos - query_offset)[:, :, None], cols[:, None, :]]  # (B_img, T_q, N, H)
        block = block.permute(0, 3, 1, 2)  # (B_img, H, T_q, N)
    block = torch.where(row_mask[:, None, :, None], block, torch.zeros((), dtype=block.dtype, device=block.device))
    return block, row_mask


def release_vision_text_block(
    probs: Tensor, image_mask: Tensor, attention_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """The release's block: vision-query ROWS × text-key COLUMNS (after the image), real columns only.

    Returns block (B_img, H, N, T_c) and col_mask (B_img, T_c). Every entry is exactly 0 under the
    causal mask (a vision query at position i < j never sees text key j): kept only for the ablation.
    """
    B, H, T_p, T = probs.shape
    if T_p != T:
        raise ConfigError("the release variant needs every attention row (capture with query_from=0)")
    spans = image_spans(image_mask)
    if spans.batch.numel() == 0:
        return _no_block(probs)
    n = spans.n_tokens
    pos, col_mask = _text_after_image(spans, attention_mask, T)  # (B_img, T_c) key positions
    rows = spans.start[:, None] + torch.arange(n, device=probs.device)  # (B_img, N)
    block = probs[spans.batch[:, None, None], :, rows[:, :, None], pos[:, None, :]]  # (B_img, N, T_c, H)
    return block.permute(0, 3, 1, 2), col_mask  # (B_img, H, N, T_c)


# ----------------------------------------------------------------------------- adapters

class HeadAdapter(nn.Module):
    """Teacher heads → student heads: 1×1 Conv2d over the head axis, with bias.

    Each student head is an affine mix of all teacher heads, so any counts work, fewer teacher heads
    than student heads included (then several student heads are mixes of the same few teacher maps).
    """

    def __init__(self, teacher_heads: int, student_heads: int):
        super().__init__()
        self.conv = nn.Conv2d(teacher_heads, student_heads, kernel_size=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.to(self.conv.weight.dtype))  # (B, H_t, R, C) -> (B, H_s, R, C)


class VisionAdapter(nn.Module):
    """Teacher vision-token width → student width, per token: Linear with bias (= the release's Conv1d k=1)."""

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__()
        self.proj = nn.Linear(teacher_dim, student_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.to(self.proj.weight.dtype))  # (B_img, N, D_t) -> (B_img, N, D_s)


# ----------------------------------------------------------------------------- alignment terms

def attention_loss(student_block: Tensor, adapted_teacher_block: Tensor, row_mask: Tensor) -> Tensor:
    """MSE between the blocks over the valid rows (every head and vision column of a valid row)."""
    diff2 = (student_block.float() - adapted_teacher_block.float()).pow(2)  # (B_img, H, T_q, N)
    keep = row_mask[:, None, :, None].to(diff2.dtype)  # (B_img, 1, T_q, 1)
    # a masked mean, not diff2[keep]: no sync, no (B_img·H·T_q·N)-long index and its scatter in backward;
    # no valid row gives 0 / 1, a zero that still backpropagates
    count = row_mask.sum() * (diff2.shape[1] * diff2.shape[3])
    return (diff2 * keep).sum() / count.clamp(min=1)


@torch.no_grad()
def focus_indices(teacher_block: Tensor, row_mask: Tensor, k: int = 16) -> Tensor:
    """(B_img, k) indices of the vision tokens the teacher's text rows attend to most.

    Score per vision token = head-averaged block summed over the valid text rows.
    """
    n = teacher_block.shape[-1]
    if k > n:
        raise ConfigError(f"top_k={k} is larger than the {n} vision tokens")
    score = teacher_block.float().mean(1)  # (B_img, T_q, N)
    score = (score * row_mask[:, :, None]).sum(1)  # (B_img, N)
    return score.topk(k, dim=-1).indices


def vision_loss(
    student_feats: Tensor, adapted_teacher_feats: Tensor, focus_idx: Tensor, focus_rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(V-all, V-focus): MSE over all vision tokens, and over the `focus_idx` tokens (B_img, k).

    focus_rows (B_img,) bool optionally restricts V-focus to samples whose focus is meaningful (an image
    with no text after it has no attention to rank tokens by).
    """
    diff2 = (student_feats.float() - adapted_teacher_feats.float()).pow(2)  # (B_img, N, D)
    v_all = diff2.mean()
    picked = diff2.gather(1, focus_idx[:, :, None].expand(-1, -1, diff2.shape[-1]))  # (B_img, k, D)
    if focus_rows is None:
        return v_all, picked.mean() if picked.numel() else diff2.sum() * 0.0
    # a masked mean over the kept samples (no boolean index: no sync); none kept gives 0 / 1 = 0
    keep = focus_rows[:, None, None].to(picked.dtype)  # (B_img, 1, 1)
    count = focus_rows.sum() * (picked.shape[1] * picked.shape[2])
    return v_all, (picked * keep).sum() / count.clamp(min=1)


# ----------------------------------------------------------------------------- the module

@dataclass
class AlignKDLossConfig:
    """The loss terms' weights and settings (a training config's `loss:` group)."""

    kd_weight: float = 1.0
    """λ_kd. 0 skips KD (with att_weight = v_weight = 0 this is the CE-only "baseline")."""
    att_weight: float = 1.0
    """λ_att for L_att. 0 skips it and builds no head adapter ("logit-kd" = att and v at 0)."""
    v_weight: float = 1.0
    """λ_v for V-all + V-focus. 0 skips it and builds no vision adapter."""
    temperature: float = 1.0
    """KD softmax temperature; the KD term is scaled by temperature². The paper uses 1."""
    kd_positions: str | None = None
    """"text" (answer tokens), "tokens" (every real token) or "all" (release). None: "text" for the
    paper variant, "all" for release."""
    top_k: int = 16
    """Number of focus vision tokens for V-focus (paper and release: 16); not the KD's k (loss.kd_topk)."""
    variant: str = "paper"
    """"paper" (the method as published) or "release" (fqhank/Align-KD's computation, for ablation)."""
    kd_topk: int | None = None
    """KD over the teacher's k most likely tokens at each position (+ their tail, kd_tail) instead of its
    whole distribution: what an offline teacher cache stores (teacher_cache=DIR; k must be the cache's), or,
    without a cache, the same loss from the teacher's logits online. None: online, the full distribution;
    with a cache, the cache's k (a cache build without it keeps the top 32; k = the vocabulary size keeps
    every token)."""
    kd_tail: str = "rest"
    """The teacher's mass outside its top kd_topk: "rest" (one more bucket holding it; the student's bucket
    is its own mass outside those tokens) or "renorm" (both sides renormalised over the k tokens). rest is
    the default: its gradient follows full KD's, renorm's does not (benchmarks/topk_tail.py)."""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.kd_tail not in TAILS:
            raise ConfigError(f"kd_tail must be one of {', '.join(TAILS)}, got {self.kd_tail!r}")
        if self.kd_topk is not None and self.kd_topk < 1:
            raise ConfigError(f"kd_topk must be >= 1 (or null for the full distribution), got {self.kd_topk}")
        if self.kd_positions is None:
            self.kd_positions = "all" if self.variant == "release" else "text"
        if self.kd_positions not in KD_POSITIONS:
            raise ConfigError(f"kd_positions must be one of {', '.join(KD_POSITIONS)}, got {self.kd_positions!r}")
        for name in ("kd_weight", "att_weight", "v_weight", "temperature"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("kd_weight", "att_weight", "v_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.temperature <= MAX_TEMPERATURE:
            raise ConfigError(f"temperature must be > 0 and at most {MAX_TEMPERATURE:g} (the KD term is scaled by "
                              f"its square), got {self.temperature}")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")


@dataclass
class DistillInputs:
    """One model's forward, as the losses need it (a dict with these keys works too).

    The teacher only needs logits, image_features and attn_probs: the layout (labels, masks) is the
    student's, since both share tokenizer and template. A teacher read from a cache gives, instead of its
    logits, its top-k log-probs at the student's KD positions (`kd_positions_mask`), rows in batch order.
    """

    logits: Tensor | None = None  # (B, T, V)
    labels: Tensor | None = None  # (B, T), -100 where not scored
    attention_mask: Tensor | None = None  # (B, T), 1 for real tokens
    image_mask: Tensor | None = None  # (B, T) bool, True on vision tokens
    image_features: Tensor | None = None  # (B_img, N, D) projector output, samples with an image
    attn_probs: Tensor | None = None  # (B, H, T - attn_query_offset, T) layer-0 probabilities
    attn_query_offset: int = 0  # first query position held in attn_probs
    topk_logprobs: Tensor | None = None  # (M, k) teacher log-probs at temperature T, M = the batch's KD positions
    topk_ids: Tensor | None = None  # (M, k) their token ids


def _as_inputs(x: DistillInputs | Mapping[str, Any]) -> DistillInputs:
    if isinstance(x, DistillInputs):
        return x
    names = {f.name for f in fields(DistillInputs)}
    unknown = set(x) - names
    if unknown:
        raise ConfigError(f"unknown distillation inputs {sorted(unknown)}; expected some of {sorted(names)}")
    return DistillInputs(**x)


def _require(x: DistillInputs, who: str, *names: str) -> None:
    missing = [n for n in names if getattr(x, n) is None]
    if missing:
        raise ConfigError(f"{who} inputs lack {missing}, which the configured loss terms need")


class AlignKDLoss(nn.Module):
    """CE + λ_kd·KD + λ_att·L_att + λ_v·(V-all + V-focus); holds the two adapters (saved with the loss,
    not part of the exported student). Trainable in the paper variant, frozen in release."""

    def __init__(
        self,
        config: AlignKDLossConfig,
        teacher_heads: int,
        student_heads: int,
        teacher_dim: int,
        student_dim: int,
    ):
        super().__init__()
        self.config = config
        self.head_adapter = HeadAdapter(teacher_heads, student_heads) if config.att_weight > 0 else None
        self.vision_adapter = VisionAdapter(teacher_dim, student_dim) if config.v_weight > 0 else None
        if config.variant == "release":
            self.requires_grad_(False)  # the release's adapters never reach its optimizer

    def forward(
        self, student: DistillInputs | Mapping[str, Any], teacher: DistillInputs | Mapping[str, Any] | None
    ) -> dict[str, Tensor]:
        """Named scalar terms: ce, kd, att, v_all, v_focus, total. Zero-weighted terms are not computed
        (0 in the dict); teacher may be None when every weight is 0 (the CE-only baseline)."""
        cfg, s = self.config, _as_inputs(student)
        _require(s, "student", "labels", "attention_mask")
        if teacher is None:
            if cfg.kd_weight > 0 or cfg.att_weight > 0 or cfg.v_weight > 0:
                raise ConfigError("teacher inputs are required unless kd, att and v weights are all 0")
            teacher = DistillInputs(logits=s.logits)  # never read
        t = _as_inputs(teacher)
        zero = s.logits.new_zeros((), dtype=torch.float32)
        # the student's answer rows and their log-probs, once: CE's, and KD's at its default positions and T = 1
        rows, idx = scored_rows(s.logits, kd_positions_mask(s.labels, None, "text"))  # (M, V), (M,)
        logp = F.log_softmax(rows.float(), dim=-1)  # (M, V)
        out = {"ce": _ce_from_logp(logp, s.labels, idx, s.logits), "kd": zero, "att": zero, "v_all": zero,
               "v_focus": zero}
        text_rows = (rows, idx, logp) if cfg.kd_weight > 0 and cfg.kd_positions == "text" else None
        del rows  # (M, V): kept (in text_rows) only while KD reads it

        if cfg.kd_weight > 0:
            out["kd"] = self._kd(s, t, text_rows)
        del text_rows

        if cfg.att_weight > 0 or cfg.v_weight > 0:
            _require(s, "student", "image_mask")
            if s.image_mask.bool().any():
                out.update(self._alignment(s, t))
            else:
                # No image in this batch: zeros tied to the adapters, so every trainable parameter still
                # gets a (zero) gradient and ranks of a sharded/DDP run reduce the same parameters.
                tied = sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), zero)
                out["att"], out["v_all"], out["v_focus"] = tied, tied, tied

        out["total"] = (
            out["ce"]
            + cfg.kd_weight * out["kd"]
            + cfg.att_weight * out["att"]
            + cfg.v_weight * (out["v_all"] + out["v_focus"])
        )
        return out

    def _kd(self, s: DistillInputs, t: DistillInputs, text_rows: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        """Full-distribution KD from the teacher's logits, or top-k KD from its cached top-k (or, with
        kd_topk and no cache, from the top-k of its logits). text_rows: the student's rows at the answer
        positions, their indices and log-probs at T = 1 (CE's), when KD reads the same positions."""
        cfg = self.config
        if text_rows is not None:
            s_rows, idx, s_logp = text_rows
            s_logp = s_logp if cfg.temperature == 1 else None  # CE's are at T = 1
        else:
            s_rows, idx = scored_rows(s.logits, kd_positions_mask(s.labels, s.attention_mask, cfg.kd_positions))
            s_logp = None
        if t.topk_ids is None:  # from the teacher's logits
            _require(t, "teacher", "logits")
            if s_rows.shape[0] == 0:
                return s.logits.sum() * 0.0
            t_rows = _teacher_rows(t.logits, idx, s.logits.shape)  # (M, V)
        if s_logp is None:
            s_logp = F.log_softmax(s_rows.float() / cfg.temperature, dim=-1)  # (M, V)
        if t.topk_ids is None and cfg.kd_topk is None:
            return _full_kl(s_logp, t_rows, cfg.temperature)
        if t.topk_ids is None:
            logp, ids = teacher_topk(t_rows, cfg.kd_topk, cfg.temperature)  # (M, k) each
        else:
            logp, ids = t.topk_logprobs, t.topk_ids
            if ids.shape[0] != s_rows.shape[0]:
                raise ConfigError(f"the teacher's top-k has {ids.shape[0]} rows, the batch {s_rows.shape[0]} "
                                  "KD positions")
        return topk_kd_loss(s_rows, logp, ids, cfg.temperature, cfg.kd_tail, student_logp=s_logp)

    def _alignment(self, s: DistillInputs, t: DistillInputs) -> dict[str, Tensor]:
        cfg, out = self.config, {}
        feats = ["image_features"] if cfg.v_weight > 0 else []
        _require(s, "student", *(["attn_probs"] if cfg.att_weight > 0 else []), *feats)
        _require(t, "teacher", "attn_probs", *feats)  # the teacher's map also ranks the focus tokens
        if cfg.att_weight > 0 and s.attn_query_offset != t.attn_query_offset:
            raise ConfigError("student and teacher attention must be captured from the same first row")

        if cfg.variant == "paper":
            spans = image_spans(s.image_mask)  # one layout for both models' blocks
            t_block, rows = text_vision_block(t.attn_probs, s.image_mask, s.attention_mask, t.attn_query_offset, spans)
            if cfg.att_weight > 0:
                s_block, _ = text_vision_block(s.attn_probs, s.image_mask, s.attention_mask, s.attn_query_offset, spans)
                out["att"] = attention_loss(s_block, self.head_adapter(t_block), rows)
            if cfg.v_weight > 0:
                focus, focus_rows = focus_indices(t_block, rows, cfg.top_k), rows.any(1)
        else:
            if cfg.att_weight > 0:
                s_att, cols = release_vision_text_block(s.attn_probs, s.image_mask, s.attention_mask)
                t_att, _ = release_vision_text_block(t.attn_probs, s.image_mask, s.attention_mask)
                # MSE is elementwise: transpose so the column mask sits on the axis attention_loss masks
                s_att, t_att = s_att.transpose(2, 3), self.head_adapter(t_att).transpose(2, 3)  # (B_img, H_s, T_c, N)
                out["att"] = attention_loss(s_att, t_att, cols)
            if cfg.v_weight > 0:
                focus, focus_rows = self._release_focus(t.attn_probs, s.image_mask, s.attention_mask), None

        if cfg.v_weight > 0:
            n_img = int(s.image_mask.bool().any(1).sum())
            for who, x in (("student", s), ("teacher", t)):
                if x.image_features.shape[0] != n_img:
                    raise ConfigError(
                        f"{who} image_features has {x.image_features.shape[0]} images, image_mask marks {n_img}"
                    )
            out["v_all"], out["v_focus"] = vision_loss(
                s.image_features, self.vision_adapter(t.image_features), focus, focus_rows
            )
        return out

    @torch.no_grad()
    def _release_focus(self, t_probs: Tensor, image_mask: Tensor, attention_mask: Tensor) -> Tensor:
        """Release focus: top-k over ALL keys of the head-averaged map summed over (real) query rows,
        shifted to feature indices as the release does (key - 2 for an image at 1), wrapped mod N."""
        if t_probs.shape[2] != t_probs.shape[3]:
            raise ConfigError("the release variant needs every attention row (capture with query_from=0)")
        spans = image_spans(image_mask)
        k, n = self.config.top_k, spans.n_tokens
        if k > n:
            raise ConfigError(f"top_k={k} is larger than the {n} vision tokens")
        p = t_probs[spans.batch].float().mean(1)  # (B_img, T, T)
        real = attention_mask[spans.batch].to(p.dtype)  # (B_img, T)
        score = (p * real[:, :, None]).sum(1)  # (B_img, T) per key position
        key = score.topk(k, dim=-1).indices  # (B_img, k), BOS sink included
        return (key - spans.start[:, None] - 1) % n
