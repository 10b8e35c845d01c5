"""The eager reference with llama.cpp's semantics: what llama.cpp's CLIP graph and ggml's CPU kernels compute.

THE KNOWN UPSTREAM FAULT (llama.cpp issue #25814): llama.cpp's CLIP graph appends the class token after
the 576 patches, adds the position table in that order and keeps rows 1..576, so patch 0 is lost, the class
token becomes the last image feature and the grid shifts by one. No file content undoes it, so the GGUF
parity gate compares against this reference; `target.faithful_divergence` measures what the fault costs
against the faithful eager model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from alignkd.model.mobilevlm import MobileVLM

from ..base import EagerRuntime, float_copy
from .names import lm_names, qk_heads, unpermute_qk, vision_layers_run, vision_names
from .runtime import normalise, to_uint8_image


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().to(x.dtype)


class TableActivation(nn.Module):
    """ggml's CPU GELU / quick-GELU read an FP16 table: input and output rounded to FP16 (GELU is taken
    exactly as 0 / x outside ±10; quick-GELU has no such clamp)."""

    def __init__(self, fn, clamp: bool):
        super().__init__()
        self.fn, self.clamp = fn, clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _f16(self.fn(_f16(x)))
        if self.clamp:
            y = torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))
        return y


class F16Im2col(nn.Module):
    """ggml runs a conv with an F16 kernel as im2col in F16: the input is rounded to F16 first."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_f16(x))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")  # ggml_gelu is the tanh approximation


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _table_gelu() -> TableActivation:
    return TableActivation(_gelu_tanh, clamp=True)


VIT_ACTIVATIONS = {  # clip.use_gelu False / True
    "quick_gelu": lambda: TableActivation(_quick_gelu, clamp=False),
    "gelu": _table_gelu,
}


def llamacpp_image_features(clip: nn.Module, pixels: torch.Tensor, n_layers: int) -> torch.Tensor:
    """(B, 3, S, S) → (B, P, D): what llama.cpp's CLIP graph hands the projector (issue #25814).

    The class token is appended after the P patches and the position table added in that order
    (patch i gets position i, the class token position P); after n_layers layers rows 1..P are kept:
    patch 0 is dropped and the class token is the last feature.
    """
    emb = clip.embeddings
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, P, D)
    cls = emb.class_embedding.expand(patches.shape[0], 1, -1)  # (B, 1, D)
    x = torch.cat([patches, cls], 1) + emb.position_embedding.weight[None]  # (B, P+1, D)
    x = clip.pre_layrnorm(x)
    for layer in clip.encoder.layers[:n_layers]:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    return x[:, 1:]  # (B, P, D)


def _load_gguf_weights(m: MobileVLM, lm: dict[str, np.ndarray], mm: dict[str, np.ndarray]) -> None:
    """Put the (de-quantized) tensors of a GGUF pair into `m` (float32), undoing the q/k permutation.
    Assigned, not copied into: `m` shares its other tensors with the model it was copied from."""
    sd = {}
    for ours, name in lm_names(m):
        heads = qk_heads(m, name)
        arr = unpermute_qk(lm[name], heads) if heads is not None else lm[name]
        sd[ours] = torch.from_numpy(arr)
    if m.config.text.tie_word_embeddings:
        sd["lm.lm_head.weight"] = sd["lm.model.embed_tokens.weight"]
    for ours, name in vision_names(m):
        sd[ours] = torch.from_numpy(mm[name])
    shapes = m.state_dict()
    m.load_state_dict({k: v.reshape(shapes[k].shape) for k, v in sd.items()}, strict=False, assign=True)


def llamacpp_model(model: MobileVLM, lm: dict[str, np.ndarray], mm: dict[str, np.ndarray]) -> MobileVLM:
    """A float32 copy of `model` computing as ggml does on CPU — table activations, tanh GELU in the
    projector, F16 im2col for the two convs (whose kernels the mmproj stores F16) — carrying the weights of
    a GGUF pair. It shares every tensor the pair holds unchanged with `model` (float_copy)."""
    m = float_copy(model).eval()
    _load_gguf_weights(m, lm, mm)
    clip = m.vision_tower.vision_tower
    for layer in clip.encoder.layers:
        layer.mlp.activation_fn = VIT_ACTIVATIONS[model.config.vision.hidden_act]()
    clip.embeddings.patch_embedding = F16Im2col(clip.embeddings.patch_embedding)
    m.mm_projector.mlp.mlp[1] = _table_gelu()
    m.mm_projector.peg.peg[0] = F16Im2col(m.mm_projector.peg.peg[0])
    return m


class LlamaCppReferenceRuntime(EagerRuntime):
    """`Runtime` over a `llamacpp_model`: the class-token fault and ggml's activations in the image path,
    the LM as in eager."""

    def __init__(self, model: MobileVLM):
        super().__init__(model)
        self.n_layers = vision_layers_run(model)

    @torch.no_grad()
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        v = self.model.config.vision
        # llama.cpp sees the uint8 bitmap: the reference sees the same pixels
        px = torch.from_numpy(normalise(to_uint8_image(pixels, v.image_mean, v.image_std), v.image_mean, v.image_std))[None]
        feats = llamacpp_image_features(self.model.vision_tower.vision_tower, px, self.n_layers)  # (1, P, Dv)
        return self.model.project(feats)[0].numpy()  # (N, H)

    def close(self) -> None:
        """Drops the copy (its de-quantized LM is several GB at 1.7B)."""
        super().close()
        self.model = None
