"""Name tables: MobileVLM state-dict names ↔ GGUF tensor names (as llama.cpp's `convert_hf_to_gguf.py` names
them), and the q/k row permutation llama.cpp's rope layout needs."""

from __future__ import annotations

import numpy as np

from alignkd.errors import ConfigError
from alignkd.model.mobilevlm import MobileVLM

LM_GLOBAL_NAMES: tuple[tuple[str, str], ...] = (
    ("lm.model.embed_tokens.weight", "token_embd.weight"),
    ("lm.model.norm.weight", "output_norm.weight"),
    ("lm.lm_head.weight", "output.weight"),
)
LM_LAYER_NAMES: tuple[tuple[str, str], ...] = (  # under lm.model.layers.{i}. ↔ blk.{i}.
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
)
_CLIP = "vision_tower.vision_tower."
VISION_GLOBAL_NAMES: tuple[tuple[str, str], ...] = (
    (_CLIP + "embeddings.patch_embedding.weight", "v.patch_embd.weight"),
    (_CLIP + "embeddings.class_embedding", "v.class_embd"),
    (_CLIP + "embeddings.position_embedding.weight", "v.position_embd.weight"),
    (_CLIP + "pre_layrnorm.weight", "v.pre_ln.weight"),
    (_CLIP + "pre_layrnorm.bias", "v.pre_ln.bias"),
    ("mm_projector.mlp.mlp.0.weight", "mm.model.mlp.0.weight"),
    ("mm_projector.mlp.mlp.0.bias", "mm.model.mlp.0.bias"),
    ("mm_projector.mlp.mlp.2.weight", "mm.model.mlp.2.weight"),
    ("mm_projector.mlp.mlp.2.bias", "mm.model.mlp.2.bias"),
    ("mm_projector.peg.peg.0.weight", "mm.model.peg.0.weight"),
    ("mm_projector.peg.peg.0.bias", "mm.model.peg.0.bias"),
)
VISION_LAYER_NAMES: tuple[tuple[str, str], ...] = tuple(  # under ...encoder.layers.{i}. ↔ v.blk.{i}.
    (f"{ours}.{p}", f"{theirs}.{p}")
    for ours, theirs in (
        ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
        ("self_attn.out_proj", "attn_out"), ("layer_norm1", "ln1"), ("layer_norm2", "ln2"),
        ("mlp.fc1", "ffn_up"), ("mlp.fc2", "ffn_down"),
    )
    for p in ("weight", "bias")
)
LLAMACPP_GRID = 24  # llama.cpp's ldpv2 graph hard-codes a 24×24 patch grid pooled 2×2 to 12×12


def lm_names(model: MobileVLM) -> list[tuple[str, str]]:
    rows = [r for r in LM_GLOBAL_NAMES if not (r[1] == "output.weight" and model.config.text.tie_word_embeddings)]
    for i in range(model.config.text.num_layers):
        rows += [(f"lm.model.layers.{i}.{a}", f"blk.{i}.{b}") for a, b in LM_LAYER_NAMES]
    return rows


def vision_layers_run(model: MobileVLM) -> int:
    """ViT layers whose output feeds the projector (hidden_states[select_layer])."""
    v = model.config.vision
    n = v.select_layer if v.select_layer >= 0 else v.num_layers + 1 + v.select_layer
    if not 1 <= n <= v.num_layers - 1:
        # llama.cpp runs block_count − 1 layers: reaching layer n needs n + 1 stored blocks
        raise ConfigError(f"mm_vision_select_layer {v.select_layer} cannot be expressed in an mmproj GGUF "
                          f"(llama.cpp stops one layer before the last stored block)")
    return n


def vision_names(model: MobileVLM) -> list[tuple[str, str]]:
    rows = list(VISION_GLOBAL_NAMES)
    for i in range(vision_layers_run(model) + 1):
        rows += [(f"{_CLIP}encoder.layers.{i}.{a}", f"v.blk.{i}.{b}") for a, b in VISION_LAYER_NAMES]
    return rows


# ---- q/k rows ----------------------------------------------------------------------------------------
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows → llama.cpp's interleaved rope layout (what convert_hf_to_gguf does)."""
    d = w.shape[0]
    return w.reshape(n_head, 2, d // n_head // 2, -1).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    d = w.shape[0]
    return w.reshape(n_head, d // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


ROPE_PERMUTED = {"attn_q.weight": "num_heads", "attn_k.weight": "num_kv_heads"}  # blk.{i}.<name> → its head count


def qk_heads(model: MobileVLM, gguf_name: str) -> int | None:
    """The head count to permute a q/k weight with, None for every other tensor."""
    field = ROPE_PERMUTED.get(gguf_name.split(".", 2)[-1]) if gguf_name.startswith("blk.") else None
    return getattr(model.config.text, field) if field else None
