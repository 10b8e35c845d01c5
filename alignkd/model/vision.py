"""The CLIP vision tower: transformers' own `CLIPVisionModel`, frozen, features from hidden layer −2
(its modules, run only as far as that layer)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import VisionConfig


def to_clip_config(v: VisionConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        projection_dim=v.projection_dim,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        num_channels=3,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
    )


def from_clip_config(d: dict, preprocessor: dict | None = None) -> VisionConfig:
    """A CLIP config dict (a CLIPVisionConfig, or a full CLIPConfig with `vision_config`) → VisionConfig."""
    d = d.get("vision_config", d)
    kw = dict(
        image_size=d.get("image_size", 224),
        patch_size=d.get("patch_size", 32),
        hidden_size=d.get("hidden_size", 768),
        num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 12),
        intermediate_size=d.get("intermediate_size", 3072),
        hidden_act=d.get("hidden_act", "quick_gelu"),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        projection_dim=d.get("projection_dim", 512),
    )
    if preprocessor:
        kw["image_mean"] = tuple(preprocessor.get("image_mean", VisionConfig.image_mean))
        kw["image_std"] = tuple(preprocessor.get("image_std", VisionConfig.image_std))
    return VisionConfig(**kw)


def preprocessor_dict(v: VisionConfig) -> dict:
    """An HF `preprocessor_config.json` for the tower (what CLIPImageProcessor reads)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "crop_size": {"height": v.image_size, "width": v.image_size},
        "size": {"shortest_edge": v.image_size},
        "do_center_crop": True, "do_normalize": True, "do_resize": True, "do_rescale": True,
        "do_convert_rgb": True, "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": list(v.image_mean), "image_std": list(v.image_std),
    }


class VisionTower(nn.Module):
    """Wraps `CLIPVisionModel`; returns the patch features of hidden layer `select_layer` (CLS dropped)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionModel(to_clip_config(config))
        self.requires_grad_(False)  # frozen in MobileVLM V2 and in Align-KD, for teacher and student

    @property
    def layers_used(self) -> int:
        """Encoder layers up to `select_layer` (hidden_states[0] is the embeddings, [i] layer i's output):
        23 of CLIP-L's 24 for −2. The layers after it never reach the features, so they are not run."""
        return self.config.select_layer % (self.config.num_layers + 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_tower  # transformers 5: embeddings, pre_layrnorm, encoder at the top level
        dtype = vm.embeddings.patch_embedding.weight.dtype
        # The tower is frozen: no autograd graph through it, which saves its activations' memory.
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(dtype)))  # (B, 1 + grid², Dv) = hidden_states[0]
            for layer in vm.encoder.layers[: self.layers_used]:
                h = layer(h, None)
        return h[:, 1:]  # (B, grid², Dv): CLS dropped
