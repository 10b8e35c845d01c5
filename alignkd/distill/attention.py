"""Layer-0 attention probabilities of a LLaMA LM without `output_attentions` or eager attention.

Align-KD only needs layer 0's post-softmax map. Turning on `output_attentions` forces eager attention
on every layer (slower, T×T maps kept for all layers), so instead hooks on layer 0's attention grab
what it computes anyway (q_proj / k_proj outputs, rotary cos/sin, the mask transformers built for the
model's attention implementation) and redo only softmax(q·kᵀ/√d + mask), in fp32. Every other layer,
and layer 0's own output, still go through SDPA / flash.

    with capture_layer0_attention(student_lm) as cap:
        out = student_lm(inputs_embeds=..., attention_mask=...)
    probs = cap.probs  # (B, H, T - cap.query_from, T), differentiable into q_proj / k_proj

Gradient checkpointing of layer 0 recomputes its forward in backward: keep the capture open until
backward is done, or leave layer 0 un-checkpointed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from alignkd.errors import ConfigError


def _layer0_attention(lm: nn.Module) -> nn.Module:
    base = getattr(lm, "model", lm)  # LlamaForCausalLM -> LlamaModel; a LlamaModel is accepted as is
    layers = getattr(base, "layers", None)
    if layers is None or len(layers) == 0 or not hasattr(layers[0], "self_attn"):
        raise ConfigError(f"{type(lm).__name__} has no `model.layers[0].self_attn` to capture attention from")
    return layers[0].self_attn


class Layer0Capture:
    """Hooks on `lm.model.layers[0].self_attn`; after each forward `.probs` holds its attention.

    query_from: compute only query rows >= query_from (all key columns are still used for the
    softmax). Set it before the forward, e.g. to the first text position after the earliest image,
    to skip the rows Align-KD never reads.
    """

    def __init__(self, lm: nn.Module, query_from: int = 0):
        self.attn = _layer0_attention(lm)
        self.query_from = query_from
        self.probs: Tensor | None = None
        self._handles: list[Any] = []
        self._q: Tensor | None = None
        self._k: Tensor | None = None
        self._call: dict[str, Any] = {}

    # --- hook plumbing
    def attach(self) -> "Layer0Capture":
        if not self._handles:
            self._handles = [
                self.attn.register_forward_pre_hook(self._pre, with_kwargs=True),
                self.attn.q_proj.register_forward_hook(self._keep("_q")),
                self.attn.k_proj.register_forward_hook(self._keep("_k")),
                self.attn.register_forward_hook(self._post),
            ]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._q, self._k, self._call = [], None, None, {}

    def __enter__(self) -> "Layer0Capture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _keep(self, name: str):
        def hook(module, args, output):
            setattr(self, name, output)

        return hook

    def _pre(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        # keys from earlier steps live only in the cache; q_proj/k_proj see this step's tokens alone
        if cache is not None and cache.get_seq_length(module.layer_idx) > 0:
            raise ConfigError("layer-0 attention capture needs a full forward without cached keys")
        self._call = {"pos": kwargs.get("position_embeddings"), "mask": kwargs.get("attention_mask")}

    def _post(self, module, args, output):
        try:
            self.probs = self._compute(module, self._q, self._k, **self._call)
        finally:
            self._q, self._k, self._call = None, None, {}  # drop references to the activations

    # --- the computation
    def _compute(self, module: nn.Module, q: Tensor, k: Tensor, pos: Any, mask: Any) -> Tensor:
        if pos is None:
            raise ConfigError("layer-0 attention got no position_embeddings (cos, sin): unsupported model")
        B, T, _ = q.shape
        d, r = module.head_dim, self.query_from
        if not 0 <= r < T:
            raise ConfigError(f"query_from={r} is outside the sequence of length {T}")
        # fp32 throughout, autocast off: bf16 probabilities would blur the small text→vision entries
        with torch.autocast(device_type=q.device.type, enabled=False):
            q = q.float().view(B, T, -1, d).transpose(1, 2)  # (B, H, T, d)
            k = k.float().view(B, T, -1, d).transpose(1, 2)  # (B, H_kv, T, d)
            cos, sin = pos
            q, k = apply_rotary_pos_emb(q, k, cos.float(), sin.float())
            if q.shape[1] != k.shape[1]:  # GQA, as transformers' repeat_kv (MHA: no copy)
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, T, d)
            scores = (q[:, :, r:] @ k.transpose(-2, -1)) * module.scaling  # (B, H, T_q, T)
            scores = self._mask(scores, mask, r)
            return scores.softmax(dim=-1)  # (B, H, T_q, T)

    @staticmethod
    def _mask(scores: Tensor, mask: Any, r: int) -> Tensor:
        B, H, T_q, T = scores.shape
        neg = torch.finfo(scores.dtype).min  # not -inf: a fully masked row becomes uniform, never NaN
        if mask is not None and not isinstance(mask, Tensor):
            raise ConfigError(f"unsupported attention mask type {type(mask).__name__} (use sdpa, eager or flash)")
        if mask is not None and mask.dim() == 4:
            if mask.shape[-1] != T:
                raise ConfigError(f"attention mask covers {mask.shape[-1]} keys, the layer saw {T}")
            mask = mask[:, :, r:]  # (B|1, 1, T_q, T)
            if mask.dtype == torch.bool:  # sdpa: True = attend
                return scores.masked_fill(~mask, neg)
            return (scores + mask.float()).clamp(min=neg)  # eager: additive 0 / dtype-min
        rows = torch.arange(r, r + T_q, device=scores.device)
        allowed = rows[:, None] >= torch.arange(T, device=scores.device)  # (T_q, T) causal
        if mask is not None:  # flash: 2D key padding mask, 1 = real token
            if mask.dim() != 2 or mask.shape[-1] != T:
                raise ConfigError(f"unexpected attention mask of shape {tuple(mask.shape)}")
            allowed = allowed & mask.bool()[:, None, None, :]  # (B, 1, T_q, T)
        return scores.masked_fill(~allowed, neg)


def capture_layer0_attention(lm: nn.Module, query_from: int = 0) -> Layer0Capture:
    """Context manager: `with capture_layer0_attention(lm) as cap: lm(...)`, then read `cap.probs`."""
    return Layer0Capture(lm, query_from=query_from)


def layer0_attention(lm: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                     query_from: int = 0) -> Tensor:
    """Layer 0's attention probabilities (B, H, T - query_from, T) from (B, T, D) `inputs_embeds`, without
    running the layer: its input norm, q_proj, k_proj and the rotary embedding are all the map needs. The same
    values as a forward under `capture_layer0_attention` (same modules, same order of operations), for a frozen
    teacher whose layer-0 output nothing reads (a cached Align-KD run): its v_proj, o_proj, attention output
    and MLP — 5/6 of the layer's work — never run. attention_mask: (B, T) padding mask, 1 = real token."""
    cap = Layer0Capture(lm, query_from)
    base = getattr(lm, "model", lm)
    position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]  # (1, T), as a full forward
    pos = base.rotary_emb(inputs_embeds, position_ids=position_ids)  # (cos, sin), each (1, T, d)
    h = base.layers[0].input_layernorm(inputs_embeds)  # (B, T, D)
    return cap._compute(cap.attn, cap.attn.q_proj(h), cap.attn.k_proj(h), pos, attention_mask)
