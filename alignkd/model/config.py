"""Typed configs and named presets for MobileVLM V2 (DESIGN.md §1).

A `MobileVLMConfig` is three parts: the CLIP vision tower, the LDPv2 projector, the LLaMA LM. It converts
to and from the mtgv `config.json` (a LlamaConfig dict plus `mm_*` fields) so real checkpoints load
unchanged. Presets: the two real models and tiny teacher/student models of the same classes for CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN_INDEX = -200
"""Placeholder id in input ids where the projected vision tokens are spliced in (MobileVLM's value)."""
IGNORE_INDEX = -100
"""Label value that the cross-entropy (and the KD position mask) ignores."""
CLIP_L14_336 = "openai/clip-vit-large-patch14-336"
PROJECTOR_TYPES = ("ldpnetv2",)
IMAGE_ASPECT_RATIOS = ("pad", "square")
"""`image_aspect_ratio` values: "pad" pads to square with the mean colour first, "square" (LLaVA's) does not."""


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP ViT vision tower."""

    image_size: int = 336
    """Input side in pixels (square)."""
    patch_size: int = 14
    """Patch side; image_size / patch_size must be 24 (LDPv2 pools 24×24 → 12×12; llama.cpp hard-codes it)."""
    hidden_size: int = 1024
    """ViT width; the projector's input dim (`mm_hidden_size`)."""
    num_layers: int = 24
    """ViT depth (all layers are kept in the checkpoint; only those up to `select_layer` are run)."""
    num_heads: int = 16
    """Attention heads of the ViT."""
    intermediate_size: int = 4096
    """ViT MLP width."""
    hidden_act: str = "quick_gelu"
    """CLIP's activation."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    projection_dim: int = 768
    """CLIP's text/image projection width (unused by MobileVLM, kept so the CLIP config round-trips)."""
    select_layer: int = -2
    """Which `hidden_states` entry feeds the projector (`mm_vision_select_layer`)."""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean for normalisation (also the pad-to-square background colour ×255)."""
    image_std: tuple[float, float, float] = CLIP_STD
    """Per-channel std for normalisation."""

    @property
    def grid(self) -> int:
        """Patches per side (24 for every supported preset)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class TextConfig:
    """The LLaMA language model (MobileLLaMA or Vicuna)."""

    vocab_size: int = 32000
    """Tokenizer size (SentencePiece, 32000 for the real models)."""
    hidden_size: int = 2048
    """Model width; also the projector's output dim."""
    num_layers: int = 24
    """Decoder layers."""
    num_heads: int = 16
    """Attention heads."""
    num_kv_heads: int = 16
    """Key/value heads (MobileLLaMA and Vicuna have no GQA: equal to num_heads)."""
    intermediate_size: int = 5632
    """SwiGLU MLP width."""
    max_position_embeddings: int = 2048
    """Context length (image tokens included)."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    """Padding id (the UNK token, as in MobileVLM)."""
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class MobileVLMConfig:
    """A whole MobileVLM V2 model: vision tower → LDPv2 projector → LLaMA."""

    name: str = "custom"
    """Preset name, or "custom" for a checkpoint that matches none."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "ldpnetv2"
    """Only LDPv2 (`ldpnetv2`) is supported: MobileVLM V2's projector."""
    pooled_grid: int = 12
    """LDPv2 pools the 24×24 patch grid to this side: 12 → 144 image tokens."""
    vision_tower: str = CLIP_L14_336
    """`mm_vision_tower`: a hub id (resolved offline to a built-in config) or a local CLIP folder."""
    image_aspect_ratio: str = "pad"
    """MobileVLM pads images to square with the mean colour before the CLIP processor (see IMAGE_ASPECT_RATIOS)."""

    def __post_init__(self) -> None:
        if self.projector_type not in PROJECTOR_TYPES:
            raise ConfigError(
                f"mm_projector_type {self.projector_type!r} is not supported (supported: {', '.join(PROJECTOR_TYPES)})"
            )
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ConfigError(f"image_aspect_ratio {self.image_aspect_ratio!r} is not supported "
                              f"(supported: {', '.join(IMAGE_ASPECT_RATIOS)})")
        if self.vision.image_size % self.vision.patch_size:
            raise ConfigError(f"vision image_size {self.vision.image_size} is not a multiple of patch_size {self.vision.patch_size}")
        if self.vision.grid % self.pooled_grid:
            raise ConfigError(f"vision grid {self.vision.grid} is not divisible by the pooled grid {self.pooled_grid}")
        t = self.text
        if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
            raise ConfigError(f"hidden_size ({t.hidden_size}) must divide by num_attention_heads ({t.num_heads}), "
                              f"and num_attention_heads by num_key_value_heads ({t.num_kv_heads})")
        if t.head_dim % 2:  # RoPE rotates pairs of channels
            raise ConfigError(f"hidden_size / num_attention_heads = {t.head_dim} must be even (the head dim RoPE rotates)")

    @property
    def num_image_tokens(self) -> int:
        return self.pooled_grid * self.pooled_grid

    def replace(self, **changes) -> "MobileVLMConfig":
        return dataclasses.replace(self, **changes)

    # ---- mtgv config.json -------------------------------------------------------------------
    def to_mtgv_dict(self) -> dict:
        """The config.json the original MobileVLM code writes (LlamaConfig fields + `mm_*`)."""
        t = self.text
        return {
            "architectures": ["MobileLlamaForCausalLM"],
            "model_type": "mobilevlm",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": None,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": t.pad_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": "float32",
            "mm_vision_tower": self.vision_tower,
            "vision_tower_type": "clip",
            "mm_projector_type": self.projector_type,
            "mm_hidden_size": self.vision.hidden_size,
            "mm_vision_select_layer": self.vision.select_layer,
            "mm_vision_select_feature": "patch",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "image_aspect_ratio": self.image_aspect_ratio,
            "use_mm_proj": True,
            "alignkd_preset": self.name,
            # MobileVLM's LDPv2 always pools to 12×12, so its configs have no key for it: written only when not 12
            **({"alignkd_pooled_grid": self.pooled_grid} if self.pooled_grid != 12 else {}),
        }

    @classmethod
    def from_mtgv_dict(cls, d: dict, vision: VisionConfig, where: str = "config.json") -> "MobileVLMConfig":
        """Read an mtgv config dict; `vision` comes from resolving `mm_vision_tower` (see checkpoint.py)."""
        if d.get("model_type") not in ("mobilevlm", "llava", "llama"):
            raise ConfigError(f"{where}: model_type {d.get('model_type')!r} is not a MobileVLM config (expected 'mobilevlm')")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "mm_projector_type"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
        if d.get("mm_vision_select_feature", "patch") != "patch":
            raise ConfigError(f"{where}: mm_vision_select_feature {d['mm_vision_select_feature']!r} is not supported (only 'patch')")
        if d.get("mm_use_im_start_end"):
            raise ConfigError(f"{where}: mm_use_im_start_end=true is not supported by MobileVLM V2")
        if "mm_hidden_size" in d and d["mm_hidden_size"] != vision.hidden_size:
            raise ConfigError(f"{where}: mm_hidden_size {d['mm_hidden_size']} != vision tower hidden size {vision.hidden_size}")
        select = d.get("mm_vision_select_layer", -2)
        if isinstance(select, bool) or not isinstance(select, int) or not -vision.num_layers - 1 <= select <= vision.num_layers:
            raise ConfigError(f"{where}: mm_vision_select_layer must index the hidden states of the "
                              f"{vision.num_layers}-layer vision tower (e.g. -2), got {select!r}")
        vision = dataclasses.replace(vision, select_layer=select)

        def size(key: str, default=None) -> int:
            return _positive_int(d.get(key, default), key, where)

        def number(key: str, default: float) -> float:
            return _positive_number(d.get(key, default), key, where)

        def token_id(key: str, default: int) -> int:
            v = default if d.get(key) is None else d[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{where}: {key} must be a token id (an integer ≥ 0), got {v!r}")
            return v

        act = d.get("hidden_act", "silu")
        if act != "silu":  # the LM is LLaMA's SwiGLU (to_llama_config): another activation would load a different model
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (MobileVLM's LLaMA uses 'silu')")
        aspect = d.get("image_aspect_ratio", "pad")
        if aspect is None:  # LLaVA's null: no padding, which is "square"
            aspect = "square"
        n_heads = size("num_attention_heads")
        tie = d.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ConfigError(f"{where}: tie_word_embeddings must be true or false, got {tie!r}")
        text = TextConfig(
            vocab_size=size("vocab_size"),
            hidden_size=size("hidden_size"),
            num_layers=size("num_hidden_layers"),
            num_heads=n_heads,
            num_kv_heads=size("num_key_value_heads", n_heads) if d.get("num_key_value_heads") else n_heads,
            intermediate_size=size("intermediate_size"),
            max_position_embeddings=size("max_position_embeddings", 2048),
            rms_norm_eps=number("rms_norm_eps", 1e-6),
            rope_theta=number("rope_theta", 10000.0),
            bos_token_id=token_id("bos_token_id", 1),
            eos_token_id=token_id("eos_token_id", 2),
            pad_token_id=token_id("pad_token_id", 0),
            tie_word_embeddings=tie,
        )
        pooled_grid = _positive_int(d.get("alignkd_pooled_grid", 12), "alignkd_pooled_grid", where)
        try:
            return cls(
                name=d.get("alignkd_preset", "custom"),
                vision=vision,
                text=text,
                projector_type=d["mm_projector_type"],
                vision_tower=d.get("mm_vision_tower", CLIP_L14_336),
                image_aspect_ratio=aspect,
                pooled_grid=pooled_grid,
            )
        except ConfigError as e:  # __post_init__'s checks do not know the file
            raise ConfigError(f"{where}: {e}") from None


# Above any real model's width, depth, vocabulary or context (2**24 = 16.8 M), below sizes whose tensors overflow.
MAX_SIZE = 2**24


def _positive_int(v, name: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{where}: {name} must be a positive integer, got {v!r}")
    if v > MAX_SIZE:
        raise ConfigError(f"{where}: {name} {v} is beyond any model's (at most {MAX_SIZE:,})")
    return v


def _positive_number(v, name: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ConfigError(f"{where}: {name} must be a positive number, got {v!r}")
    return float(v)


# ---- presets -------------------------------------------------------------------------------
_VIT_L14_336 = VisionConfig()
# Tiny vision towers stay on a 24×24 patch grid (48 px / patch 2): llama.cpp hard-codes that grid.
_TINY_VISION = VisionConfig(
    image_size=48, patch_size=2, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256, projection_dim=64
)
TINY_VOCAB = 512  # the packaged tiny SentencePiece tokenizer (alignkd/assets/tiny_tokenizer)

PRESETS: dict[str, MobileVLMConfig] = {
    "mobilevlm-v2-1.7b": MobileVLMConfig(
        name="mobilevlm-v2-1.7b", vision=_VIT_L14_336,
        text=TextConfig(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=5632),
    ),
    "mobilevlm-v2-7b": MobileVLMConfig(
        name="mobilevlm-v2-7b", vision=_VIT_L14_336,
        text=TextConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008, max_position_embeddings=4096),
    ),
    # Tiny teacher is wider and has more heads than the tiny student, mirroring 4096/32 vs 2048/16.
    "tiny-student": MobileVLMConfig(
        name="tiny-student", vision=_TINY_VISION, vision_tower="vision_tower",
        text=TextConfig(vocab_size=TINY_VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                        intermediate_size=176, max_position_embeddings=512),
    ),
    "tiny-teacher": MobileVLMConfig(
        name="tiny-teacher", vision=_TINY_VISION, vision_tower="vision_tower",
        text=TextConfig(vocab_size=TINY_VOCAB, hidden_size=128, num_layers=3, num_heads=8, num_kv_heads=8,
                        intermediate_size=352, max_position_embeddings=512),
    ),
}

# The seeds study's models (benchmarks/easyvqa_seeds.py): the tiny ones with LDPv2 pooling to 6×6 (36 image
# tokens instead of 144) and a 2-layer CLIP (one layer run: select_layer −2), so that ten seeds × six students
# train to a stable point in about an hour on two cores. Not exportable to GGUF (llama.cpp pools to 12×12).
_TINY_VISION_STUDY = dataclasses.replace(_TINY_VISION, num_layers=2)
for _n in ("tiny-student", "tiny-teacher"):
    PRESETS[f"{_n}-36"] = PRESETS[_n].replace(name=f"{_n}-36", vision=_TINY_VISION_STUDY, pooled_grid=6)

# `mm_vision_tower` hub ids that resolve offline to a built-in vision config.
BUILTIN_VISION_TOWERS: dict[str, VisionConfig] = {CLIP_L14_336: _VIT_L14_336}


def get_preset(name: str) -> MobileVLMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
