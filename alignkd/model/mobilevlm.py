"""MobileVLM V2: CLIP vision tower → LDPv2 projector → LLaMA, on transformers' own modules.

The one data path of the project: pixels → vision features → projected image tokens → spliced into the
token embeddings at the image token (IMAGE_TOKEN_INDEX) → LLaMA → logits. Image tokens are made only by
`encode_images` (tower, then `project`): the forward, generation, the trainer's teacher, and the
ExecuTorch / ONNX vision graphs call it. `forward` and `generate` splice with `build_inputs_embeds`; the
exported runtimes splice the same way, one prompt at a time (`alignkd.export.runtime.splice_prompt`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ..errors import DataError
from .config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, MobileVLMConfig, TextConfig
from .decoding import decode_loop
from .projector import LDPv2Projector
from .vision import VisionTower

# transformers renamed `past_key_values` to `cache` (5.2x); the GPU image has an older 5.x. Use whichever exists.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def to_llama_config(t: TextConfig, attn_implementation: str = "sdpa") -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=t.pad_token_id,
        tie_word_embeddings=t.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


@dataclass
class VLMOutput:
    """What a multimodal forward returns (also what the distillation losses consume)."""

    logits: torch.Tensor  # (B, T, V)
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    image_mask: torch.Tensor  # (B, T) bool, True where a projected vision token sits
    labels: torch.Tensor | None = None  # (B, T) IGNORE_INDEX on prompt, image and padding
    image_features: torch.Tensor | None = None  # (B_img, N, H) projector output, batch order
    loss: torch.Tensor | None = None  # mean CE over answer tokens, when labels were given
    vision_features: torch.Tensor | None = None  # (B_img, 576, Dv) CLIP features, when pixels were given


@dataclass
class MultimodalInputs:
    inputs_embeds: torch.Tensor  # (B, T', H)
    attention_mask: torch.Tensor  # (B, T')
    image_mask: torch.Tensor  # (B, T') bool
    labels: torch.Tensor | None  # (B, T')


class MobileVLM(nn.Module):
    def __init__(self, config: MobileVLMConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.mm_projector = LDPv2Projector(config.vision.hidden_size, config.text.hidden_size, config.pooled_grid)
        self.lm = LlamaForCausalLM(to_llama_config(config.text, attn_implementation))

    # ---- the image path ----------------------------------------------------------------------
    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """(B_img, 576, Dv) CLIP features → (B_img, N, H) image tokens, in the projector's dtype."""
        return self.mm_projector(vision_features.to(self.mm_projector.dtype))  # (B_img, 144, H)

    def encode_images(self, pixel_values: torch.Tensor, return_vision_features: bool = False):
        """(B_img, 3, S, S) normalised pixels → (B_img, N, H) image tokens in the LM's space; with
        return_vision_features also the (B_img, 576, Dv) CLIP features they came from."""
        feats = self.vision_tower(pixel_values)  # (B_img, 576, Dv)
        tokens = self.project(feats)  # (B_img, 144, H)
        return (tokens, feats) if return_vision_features else tokens

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    def build_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> MultimodalInputs:
        """Splice image tokens in place of each IMAGE_TOKEN_INDEX; keep right padding.

        input_ids (B, T) with at most one image token per row, right-padded; image_features
        (B_img, N, H) for the image tokens in row-major order. The output is T' = T + (N−1)·max_images
        long; each row's tokens after its image shift right by N−1.
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_img = input_ids == IMAGE_TOKEN_INDEX  # (B, T)
        n_img = int(is_img.sum())
        n_feat = 0 if image_features is None else image_features.shape[0]
        if n_img != n_feat:
            raise DataError(f"batch has {n_img} image token(s) but {n_feat} image(s)")
        if n_img and int(is_img.sum(1).max()) > 1:
            raise DataError("at most one image per sample is supported")
        text = self.embed_tokens(input_ids.clamp(min=0))  # (B, T, H); image-token rows overwritten below
        if n_img == 0:
            img_mask = torch.zeros_like(is_img)
            return MultimodalInputs(text, attention_mask, img_mask, labels)

        n = image_features.shape[1]
        shift = (n - 1) * (is_img.cumsum(1) - is_img.long())  # (B, T) image tokens strictly before
        new_pos = torch.arange(t, device=input_ids.device) + shift  # (B, T)
        t_new = t + (n - 1)
        rows = torch.arange(b, device=input_ids.device)[:, None].expand(b, t)  # (B, T)
        embeds = text.new_zeros(b, t_new, text.shape[-1]).index_put((rows, new_pos), text)  # (B, T', H)
        mask = attention_mask.new_zeros(b, t_new).index_put((rows, new_pos), attention_mask)
        img_b, img_t = is_img.nonzero(as_tuple=True)  # (B_img,), (B_img,)
        img_pos = new_pos[img_b, img_t][:, None] + torch.arange(n, device=input_ids.device)  # (B_img, N)
        img_rows = img_b[:, None].expand_as(img_pos)
        embeds = embeds.index_put((img_rows, img_pos), image_features.to(embeds.dtype))
        mask = mask.index_put((img_rows, img_pos), mask.new_ones(()))
        image_mask = torch.zeros(b, t_new, dtype=torch.bool, device=input_ids.device)
        image_mask[img_rows, img_pos] = True
        new_labels = None
        if labels is not None:
            new_labels = labels.new_full((b, t_new), IGNORE_INDEX).index_put((rows, new_pos), labels)
            new_labels[image_mask] = IGNORE_INDEX
        return MultimodalInputs(embeds, mask, image_mask, new_labels)

    # ---- forward / generate ----------------------------------------------------------------
    def run_lm(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, cache: DynamicCache | None = None) -> torch.Tensor:
        """LLaMA on (B, T, H) embeddings → (B, T, V) logits. With a cache, the T positions are appended to it
        (position_ids then say where they sit)."""
        kw = {} if cache is None else {_CACHE_KWARG: cache}
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=cache is not None, **kw).logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        compute_loss: bool = True,
    ) -> VLMOutput:
        """Multimodal forward. Give `pixel_values` (B_img, 3, S, S) or precomputed `image_features`.

        With labels, `loss` is the mean CE over answer tokens unless compute_loss=False (the trainer
        computes its loss terms itself and only needs the spliced labels)."""
        vision_features = None
        if image_features is None and pixel_values is not None:
            image_features, vision_features = self.encode_images(pixel_values, return_vision_features=True)
        mm = self.build_inputs_embeds(input_ids, attention_mask, labels, image_features)
        if mm.inputs_embeds.shape[1] > self.config.text.max_position_embeddings:
            raise DataError(
                f"sequence of {mm.inputs_embeds.shape[1]} positions (image tokens included) exceeds the "
                f"context of {self.config.text.max_position_embeddings}"
            )
        all_logits = self.run_lm(mm.inputs_embeds, mm.attention_mask)  # (B, T', V)
        loss = None
        if mm.labels is not None and compute_loss:
            logits = all_logits[:, :-1].float()  # (B, T'-1, V)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), mm.labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
            )
        return VLMOutput(all_logits, mm.attention_mask, mm.image_mask, mm.labels, image_features, loss, vision_features)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Batched decoding with a KV cache. temperature 0 = greedy; else sampling with nucleus top_p.

        Returns the new tokens of each row, up to and excluding EOS.
        """
        eos = self.config.text.eos_token_id if eos_token_id is None else eos_token_id
        image_features = self.encode_images(pixel_values) if pixel_values is not None else None
        mm = self.build_inputs_embeds(input_ids, attention_mask, None, image_features)
        embeds, mask = _right_to_left_padding(mm.inputs_embeds, mm.attention_mask)
        b, t = mask.shape
        if t + max_new_tokens > self.config.text.max_position_embeddings:
            raise DataError(
                f"prompt of {t} positions + {max_new_tokens} new tokens exceeds the context of "
                f"{self.config.text.max_position_embeddings} (the model's max_position_embeddings)"
            )
        cache = DynamicCache() if use_cache else None
        state = {"embeds": embeds, "mask": mask}

        def forward(step_embeds: torch.Tensor) -> torch.Tensor:
            m = state["mask"]
            positions = (m.cumsum(1) - 1).clamp(min=0)[:, -step_embeds.shape[1]:]  # (B, T) left padding → real
            return self.run_lm(step_embeds, m, positions, cache)[:, -1]  # (B, V)

        def step(nxt: torch.Tensor) -> torch.Tensor:
            new = self.embed_tokens(nxt.to(embeds.device)[:, None])  # (B, 1, H)
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(b, 1)], 1)
            if not use_cache:  # without a cache every step recomputes the whole sequence
                state["embeds"] = new = torch.cat([state["embeds"], new], 1)
            return forward(new)

        return decode_loop(forward(embeds), step, max_new_tokens, eos, temperature, top_p, generator)


def _right_to_left_padding(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll each right-padded row so its real tokens end at the last column (decoding appends there)."""
    lengths = mask.sum(1)  # (B,)
    t = mask.shape[1]
    idx = (torch.arange(t, device=mask.device)[None] - (t - lengths)[:, None]) % t  # (B, T) source column
    embeds = torch.gather(embeds, 1, idx[..., None].expand_as(embeds))
    return embeds, torch.gather(mask, 1, idx)



def first_text_after_image(input_ids: torch.Tensor, n_image_tokens: int) -> int:
    """The earliest position, in the sequence `build_inputs_embeds` makes, of text after an image: the
    first attention row that can look at vision tokens (0 when no sample has an image). Known from the
    input ids alone, so a layer-0 attention capture can skip the rows before it."""
    _, img_t = (input_ids == IMAGE_TOKEN_INDEX).nonzero(as_tuple=True)  # one image per sample at most
    return int(img_t.min()) + n_image_tokens if img_t.numel() else 0
