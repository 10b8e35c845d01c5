"""Architecture summary and parameter counts per part (`alignkd-mobile info`)."""

from __future__ import annotations

import torch

from .config import MobileVLMConfig
from .mobilevlm import MobileVLM


def parameter_counts(config: MobileVLMConfig) -> dict[str, int]:
    """Counted on the meta device: no memory, so the 7B preset is as cheap as the tiny one."""
    with torch.device("meta"):
        model = MobileVLM(config)
    vision_all = sum(p.numel() for p in model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.mm_projector.parameters())
    embed = model.lm.get_input_embeddings().weight.numel()
    head = model.lm.lm_head.weight.numel() if not config.text.tie_word_embeddings else 0
    lm_all = sum(p.numel() for p in model.lm.parameters())
    return {
        "vision_tower": vision_all,
        "projector": projector,
        "lm_embeddings": embed,
        "lm_decoder": lm_all - embed - head,
        "lm_head": head,
        "total": vision_all + projector + lm_all,
    }


def describe(config: MobileVLMConfig) -> str:
    v, t = config.vision, config.text
    counts = parameter_counts(config)
    lines = [
        f"model: {config.name}",
        f"vision tower: CLIP ViT {v.image_size}px / patch {v.patch_size} ({v.grid}x{v.grid} patches), width {v.hidden_size}, "
        f"{v.num_layers} layers, {v.num_heads} heads, ffn {v.intermediate_size}, {v.hidden_act}; features from "
        f"hidden layer {v.select_layer}, CLS dropped -> {v.num_patches} x {v.hidden_size}  [frozen]",
        f"projector: LDPv2 ({config.projector_type}) Linear({v.hidden_size},{t.hidden_size}) -> GELU -> "
        f"Linear({t.hidden_size},{t.hidden_size}) -> avgpool {v.grid}x{v.grid}->{config.pooled_grid}x{config.pooled_grid} "
        f"-> PEG dwconv3x3 + residual -> {config.num_image_tokens} x {t.hidden_size}",
        f"LM: LLaMA width {t.hidden_size}, {t.num_layers} layers, {t.num_heads} heads ({t.num_kv_heads} kv), head dim "
        f"{t.head_dim}, ffn {t.intermediate_size}, vocab {t.vocab_size}, context {t.max_position_embeddings}",
        "",
        f"{'part':<16}{'parameters':>16}",
    ]
    for part, n in counts.items():
        lines.append(f"{part:<16}{n:>16,}")
    return "\n".join(lines)
