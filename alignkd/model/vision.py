"""The CLIP vision tower: transformers' own `CLIPVisionModel`, frozen, features from hidden layer −2
(its modules, run only as far as that layer)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.activations import ACT2FN

from ..errors import ConfigError
from .config import VisionConfig, _positive_int, _positive_number


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


def from_clip_config(d: dict, preprocessor: dict | None = None, where: str = "config.json",
                     preprocessor_where: str = "preprocessor_config.json") -> VisionConfig:
    """A CLIP config dict (a CLIPVisionConfig, or a full CLIPConfig with `vision_config`) → VisionConfig.
    `where`, `preprocessor_where`: the files they came from, for the error messages."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: a JSON object of CLIP config fields was expected, got a {type(d).__name__}")
    if "vision_config" in d:
        d = d["vision_config"]
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: vision_config must be a JSON object of CLIP vision fields, got {d!r}")

    def size(key: str, default: int) -> int:
        return _positive_int(d.get(key, default), key, where)

    act = d.get("hidden_act", "quick_gelu")
    if not isinstance(act, str) or act not in ACT2FN:  # transformers looks it up when it builds the tower
        raise ConfigError(f"{where}: hidden_act {act!r} is not an activation transformers knows (CLIP's: 'quick_gelu')")
    kw = dict(
        image_size=size("image_size", 224),
        patch_size=size("patch_size", 32),
        hidden_size=size("hidden_size", 768),
        num_layers=size("num_hidden_layers", 12),
        num_heads=size("num_attention_heads", 12),
        intermediate_size=size("intermediate_size", 3072),
        hidden_act=act,
        layer_norm_eps=_positive_number(d.get("layer_norm_eps", 1e-5), "layer_norm_eps", where),
        projection_dim=size("projection_dim", 512),
    )
    if kw["image_size"] % kw["patch_size"]:
        raise ConfigError(f"{where}: image_size {kw['image_size']} is not a multiple of patch_size {kw['patch_size']}")
    if kw["hidden_size"] % kw["num_heads"]:
        raise ConfigError(f"{where}: hidden_size {kw['hidden_size']} must divide by num_attention_heads {kw['num_heads']}")
    if preprocessor is not None:
        if not isinstance(preprocessor, dict):
            raise ConfigError(f"{preprocessor_where}: a JSON object of preprocessor fields was expected, "
                              f"got a {type(preprocessor).__name__}")
        kw["image_mean"] = _rgb(preprocessor.get("image_mean", VisionConfig.image_mean), "image_mean", preprocessor_where)
        kw["image_std"] = _rgb(preprocessor.get("image_std", VisionConfig.image_std), "image_std", preprocessor_where,
                               positive=True)
    return VisionConfig(**kw)


def _rgb(v, name: str, where: str, positive: bool = False) -> tuple[float, float, float]:
    """One number per channel (R, G, B); a std must be positive (pixels are divided by it)."""
    if (not isinstance(v, (list, tuple)) or len(v) != 3
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or positive and not x > 0 for x in v)):
        kind = "positive numbers" if positive else "numbers"
        raise ConfigError(f"{where}: {name} must be a list of 3 {kind} (R, G, B), got {v!r}")
    return tuple(float(x) for x in v)  # type: ignore[return-value]


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
        self.memo: FeatureMemo | None = None  # attach_feature_memo: features of images seen before are reused

    @property
    def layers_used(self) -> int:
        """Encoder layers up to `select_layer` (hidden_states[0] is the embeddings, [i] layer i's output):
        23 of CLIP-L's 24 for −2. The layers after it never reach the features, so they are not run."""
        return self.config.select_layer % (self.config.num_layers + 1)

    def drop_unused_layers(self) -> VisionTower:
        """Remove the encoder layers after `select_layer` (CLIP-L's 24th for −2): they never reach the features,
        so a copy made to ship or run the tower (an export) holds only what runs. Features unchanged; the
        checkpoint layout (all layers) is the original module's business. Returns self."""
        enc = self.vision_tower.encoder
        enc.layers = nn.ModuleList(enc.layers[: self.layers_used])
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        trains = any(p.requires_grad for p in self.parameters())
        # A frozen tower builds no autograd graph, which saves its activations' memory.
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            if self.memo is not None and not trains:
                return self.memo(pixel_values, self._features)
            return self._features(pixel_values)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_tower  # transformers 5: embeddings, pre_layrnorm, encoder at the top level
        dtype = vm.embeddings.patch_embedding.weight.dtype
        h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(dtype)))  # (B, 1 + grid², Dv) = hidden_states[0]
        for layer in vm.encoder.layers[: self.layers_used]:
            h = layer(h, None)
        return h[:, 1:]  # (B, grid², Dv): CLS dropped


class FeatureMemo:
    """A frozen tower's features of every image it has seen, kept and reused: the image encoder then runs
    once per distinct image, not once per use (epochs over a small dataset; runs and evals that share a
    tower). Attach one as `VisionTower.memo`.

    Keyed by a digest of each image's pixels, so augmented, re-cropped or other images never hit a stale
    entry. Features stay where the tower computed them (its device and dtype) until `max_bytes` is
    reached; later images are computed every time. A hit returns what the tower gave for the image in its
    first batch: equal to a fresh forward up to float rounding (kernels block by batch size)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.store: dict[bytes, torch.Tensor] = {}
        self.bytes = self.hits = self.misses = 0

    @staticmethod
    def keys(pixel_values: torch.Tensor) -> list[bytes]:
        """One 16-byte digest per image of (B_img, 3, S, S) pixels (hashed on the CPU)."""
        px = pixel_values.detach().cpu().contiguous()
        raw = px.reshape(px.shape[0], -1).view(torch.uint8).numpy()  # bytes of any dtype (numpy has no bf16)
        return [hashlib.blake2b(raw[i].tobytes(), digest_size=16).digest() for i in range(px.shape[0])]

    def __call__(self, pixel_values: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(B_img, 3, S, S) pixels → (B_img, grid², Dv) features: `compute` runs on the images not kept."""
        keys = self.keys(pixel_values)
        first = {k: i for i, k in reversed(list(enumerate(keys))) if k not in self.store}  # each new image once
        new = sorted(first.values())
        self.hits, self.misses = self.hits + len(keys) - len(new), self.misses + len(new)
        if not new:
            return torch.stack([self.store[k] for k in keys])
        fresh = dict(zip((keys[i] for i in new), compute(pixel_values[new])))  # rows of (B_new, grid², Dv)
        for k, f in fresh.items():
            if self.bytes + f.nbytes <= self.max_bytes:
                self.store[k] = f.clone()  # not a view: the batch's tensor is freed
                self.bytes += f.nbytes
        return torch.stack([self.store.get(k, fresh.get(k)) for k in keys])  # (B_img, grid², Dv)


_MEMOS: dict[bytes, FeatureMemo] = {}


def tower_digest(tower: nn.Module) -> bytes:
    """A digest of a tower's weights (names, shapes, dtypes, values) and device."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in tower.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.device};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def attach_feature_memo(tower: VisionTower, max_bytes: int) -> FeatureMemo:
    """Give a frozen `tower` this process's memo for towers of its weights on its device: models loaded
    one after another with the same tower (the demo's students copy their teacher's) reuse each other's
    features. The memo's budget is the largest asked of it."""
    if any(p.requires_grad for p in tower.parameters()):
        raise ValueError("a feature memo needs a frozen vision tower")
    memo = _MEMOS.setdefault(tower_digest(tower), FeatureMemo(max_bytes))
    memo.max_bytes = max(memo.max_bytes, max_bytes)
    tower.memo = memo
    return memo
