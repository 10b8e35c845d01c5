"""Align-KD distillation: layer-0 attention capture and the loss terms (DESIGN.md §2)."""

from alignkd.distill.attention import Layer0Capture, capture_layer0_attention, layer0_attention
from alignkd.distill.losses import (
    LOSS_TERMS,
    AlignKDLoss,
    AlignKDLossConfig,
    DistillInputs,
    HeadAdapter,
    ImageSpans,
    VisionAdapter,
    attention_loss,
    ce_loss,
    focus_indices,
    image_spans,
    kd_loss,
    kd_positions_mask,
    release_vision_text_block,
    text_vision_block,
    vision_loss,
)
from alignkd.distill.topk import TAILS, teacher_topk, topk_kd_loss

__all__ = [
    "AlignKDLoss",
    "AlignKDLossConfig",
    "DistillInputs",
    "HeadAdapter",
    "LOSS_TERMS",
    "ImageSpans",
    "Layer0Capture",
    "VisionAdapter",
    "attention_loss",
    "capture_layer0_attention",
    "ce_loss",
    "focus_indices",
    "image_spans",
    "kd_loss",
    "kd_positions_mask",
    "layer0_attention",
    "release_vision_text_block",
    "TAILS",
    "teacher_topk",
    "text_vision_block",
    "topk_kd_loss",
    "vision_loss",
]
