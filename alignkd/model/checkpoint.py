"""Load and save MobileVLM checkpoints in the mtgv format (the HF hub repos mtgv/MobileVLM_V2-*).

A directory holds `config.json` (model_type "mobilevlm"), weights as safetensors (one file or shards
with an index) or `pytorch_model*.bin` pickles (read with weights_only=True only), and the tokenizer.
Weight names follow the original code; `NAME_TABLE` maps them to this package's module names. The CLIP
config is not in config.json: `mm_vision_tower` names it (a local folder, or a hub id that resolves
offline to a built-in config). We always write a `vision_tower/` folder so our checkpoints load offline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..fileio import BAD_JSON, apply_umask, publish_dir, staged_dir, writing
from .config import BUILTIN_VISION_TOWERS, CLIP_L14_336, MobileVLMConfig, VisionConfig, get_preset, PRESETS
from .mobilevlm import MobileVLM
from .vision import from_clip_config, preprocessor_dict, to_clip_config

# (our name prefix, mtgv name prefix). transformers 5's CLIPVisionModel has no `vision_model.` level in its
# state dict; the original checkpoints (written by transformers 4.x) have it.
NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("vision_tower.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("mm_projector.", "model.mm_projector."),
    ("lm.model.", "model."),
    ("lm.lm_head.", "lm_head."),
)
# Buffers that older transformers saved into checkpoints; they are recomputed, never loaded.
IGNORED_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")
SHARD_BYTES = 2 * 1024**3
VISION_DIR = "vision_tower"


def _map(name: str, src: int, dst: int) -> str | None:
    for row in sorted(NAME_TABLE, key=lambda r: -len(r[src])):
        if name.startswith(row[src]):
            return row[dst] + name[len(row[src]):]
    return None


def to_mtgv_name(ours: str) -> str:
    mapped = _map(ours, 0, 1)
    if mapped is None:
        raise KeyError(f"no mtgv name for {ours}")
    return mapped


def from_mtgv_name(mtgv: str) -> str | None:
    return _map(mtgv, 1, 0)


# ---- config ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except BAD_JSON as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def resolve_vision_config(tower: str, ckpt_dir: Path) -> VisionConfig:
    """`mm_vision_tower` → VisionConfig, offline: a local CLIP folder (absolute or relative to the
    checkpoint) with config.json (+ preprocessor_config.json), or a known hub id."""
    # "" would be the checkpoint folder itself, whose config.json is not a CLIP config
    if not isinstance(tower, str) or not tower:
        raise ConfigError(f"{ckpt_dir / 'config.json'}: mm_vision_tower must name a local CLIP folder or a hub id, "
                          f"got {tower!r}")
    for cand in (Path(tower), ckpt_dir / tower):
        if (cand / "config.json").is_file():
            pre = cand / "preprocessor_config.json"
            return from_clip_config(_read_json(cand / "config.json"), _read_json(pre) if pre.is_file() else None,
                                    where=str(cand / "config.json"), preprocessor_where=str(pre))
    if tower in BUILTIN_VISION_TOWERS:
        return BUILTIN_VISION_TOWERS[tower]
    raise ConfigError(
        f"{ckpt_dir / 'config.json'}: mm_vision_tower {tower!r} is neither a local CLIP folder nor a known hub id "
        f"({', '.join(BUILTIN_VISION_TOWERS)}); nothing is downloaded: point it at a folder with the CLIP config.json"
    )


def load_config(ckpt_dir: str | Path) -> MobileVLMConfig:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    d = _read_json(ckpt_dir / "config.json")
    if not isinstance(d, dict):
        raise ConfigError(f"{ckpt_dir / 'config.json'}: a JSON object of config fields was expected, got a "
                          f"{type(d).__name__}")
    vision = resolve_vision_config(d.get("mm_vision_tower", CLIP_L14_336), ckpt_dir)
    return MobileVLMConfig.from_mtgv_dict(d, vision, where=str(ckpt_dir / "config.json"))


def config_from_name(preset_or_dir: str) -> MobileVLMConfig:
    return get_preset(preset_or_dir) if preset_or_dir in PRESETS else load_config(preset_or_dir)


# ---- weights -----------------------------------------------------------------------------------
def _weight_files(ckpt_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = ckpt_dir / index_name
        if index.is_file():
            files = _shard_names(index)
            missing = [f for f in files if not (ckpt_dir / f).is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
            return [ckpt_dir / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (ckpt_dir / single).is_file():
            return [ckpt_dir / single]
    shards = sorted(ckpt_dir.glob("pytorch_model-*.bin")) or sorted(ckpt_dir.glob("model-*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"no weights in {ckpt_dir}: expected model.safetensors, model-*.safetensors with an index, "
                          "or pytorch_model*.bin")


def _shard_names(index: Path) -> list[str]:
    """The shard files an index's `weight_map` names: bare file names, so no shard is read from outside the
    checkpoint folder."""
    d = _read_json(index)
    weight_map = d.get("weight_map") if isinstance(d, dict) else d
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map must be a JSON object mapping tensor names to shard file names, "
                              f"got {weight_map!r:.80}")
    bad = [f for f in weight_map.values() if not isinstance(f, str) or f in ("", ".", "..") or Path(f).name != f]
    if bad:
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names in the checkpoint "
                              f"folder (no paths), got {bad[0]!r}")
    return sorted(set(weight_map.values()))


def _read_weights(path: Path, keep) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """The shape of every tensor in one weight file, and the tensors whose (mtgv) name `keep` accepts.
    Safetensors are read tensor by tensor and pickles memory-mapped, so the other tensors are never read."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
                return shapes, {n: f.get_tensor(n) for n in shapes if keep(n)}
        # Pickled checkpoints can run arbitrary code: only ever load them with weights_only=True.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {n: tuple(t.shape) for n, t in state.items()}, {n: t for n, t in state.items() if keep(n)}
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"cannot read weights from {path}: it holds more than plain tensors and is refused "
                              f"(pickles are only loaded with weights_only=True): {str(e).splitlines()[0]}") from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read weights from {path} (truncated or corrupt?): {e}") from None


def read_mtgv_state_dict(ckpt_dir: Path, model: torch.nn.Module,
                         known: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Read the weights `model` holds (names mapped to ours), every tensor of the files checked by name and
    shape against `known` (our name → shape; default: `model`'s own). A tensor that `known` has and `model`
    has not — the later layers and head that a prefix (`keep_layers`) leaves out — is checked from the file
    header and never read."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    known = known or expected
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(ckpt_dir):
        shapes, tensors = _read_weights(f, lambda name: from_mtgv_name(name) in expected)
        for name, shape in shapes.items():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            ours = from_mtgv_name(name)
            if ours is None or ours not in known:
                raise CheckpointError(f"{f}: unexpected tensor {name!r} for this config")
            if shape != known[ours]:
                raise CheckpointError(f"{f}: tensor {name!r} has shape {shape}, the config needs {known[ours]}")
            if ours in expected:
                if not tensors[name].is_floating_point():  # a cast to the model's dtype would hide it
                    raise CheckpointError(f"{f}: tensor {name!r} has dtype {tensors[name].dtype}, "
                                          "a floating-point one is needed")
                state[ours] = tensors[name]
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(to_mtgv_name(m) for m in missing[:5])
        raise CheckpointError(f"{ckpt_dir}: {len(missing)} tensor(s) missing, e.g. {shown}")
    return state


def _materialize_buffers(model: MobileVLM) -> None:
    """Recreate the non-persistent buffers that a meta-device build left empty."""
    rotary = model.lm.model.rotary_emb
    model.lm.model.rotary_emb = type(rotary)(config=model.lm.config)
    tower = model.vision_tower.vision_tower
    emb = getattr(tower, "vision_model", tower).embeddings
    emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand((1, -1)), persistent=False)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers left on the meta device: {left}")


def keep_layers(model: MobileVLM, num_layers: int) -> MobileVLM:
    """Cut `model`'s LM, in place, to its first `num_layers` decoder layers, without the final norm and the
    LM head: the prefix that runs the vision tower, projector, embeddings and those layers only (Align-KD's
    alignment terms read the teacher's projector output and layer-0 attention; with a teacher cache nothing
    else of it is needed). `model.lm.model(inputs_embeds=...)` then returns the hidden state after layer
    `num_layers`; the model has no logits, and its forward fails."""
    lm = model.lm
    if not 1 <= num_layers <= len(lm.model.layers):
        raise ConfigError(f"num_layers={num_layers}: the LM has {len(lm.model.layers)} layers")
    lm.model.layers = lm.model.layers[:num_layers]
    lm.model.norm = nn.Identity()
    del lm.lm_head  # never built into a tensor, never moved to a device
    lm.config.num_hidden_layers = num_layers
    model.config = model.config.replace(text=dataclasses.replace(model.config.text, num_layers=num_layers))
    return model


def keep_attention_map_inputs(model: MobileVLM) -> MobileVLM:
    """After `keep_layers(model, 1)`: drop, in place, what layer 0's attention map does not read — its value and
    output projections, its MLP and the MLP's norm — so the model holds its vision side, token embeddings and
    layer 0's input norm, q_proj and k_proj: what `alignkd.distill.layer0_attention` runs (a cached Align-KD
    run's teacher). Its LM can no longer run a forward."""
    layers = model.lm.model.layers
    if len(layers) != 1 or hasattr(model.lm, "lm_head"):
        raise ConfigError("keep_attention_map_inputs needs a model cut to layer 0 first (keep_layers(model, 1))")
    layer = layers[0]
    del layer.mlp, layer.post_attention_layernorm, layer.self_attn.v_proj, layer.self_attn.o_proj
    return model


def load_model(ckpt_dir: str | Path, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa",
               num_layers: int | None = None) -> MobileVLM:
    """Load an mtgv checkpoint directory. Built on the meta device: no random init, no double memory.

    num_layers: load only the prefix `keep_layers(model, num_layers)`; the other tensors are checked (names,
    shapes) but never read, so they take no memory and never reach a device."""
    ckpt_dir = Path(ckpt_dir)
    config = load_config(ckpt_dir)
    with torch.device("meta"):
        model = MobileVLM(config, attn_implementation)
    known = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if num_layers is not None:
        keep_layers(model, num_layers)
    state = read_mtgv_state_dict(ckpt_dir, model, known)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(model)
    return model.eval()


def build_model(preset_or_dir: str, seed: int = 0, dtype: torch.dtype | None = None,
                num_layers: int | None = None) -> MobileVLM:
    """A preset with random weights (seeded), or a checkpoint directory; num_layers: only that prefix
    (`keep_layers`; a preset is built whole first, so its prefix holds the whole model's weights)."""
    if preset_or_dir not in PRESETS:
        return load_model(preset_or_dir, dtype, num_layers=num_layers)
    torch.manual_seed(seed)
    model = MobileVLM(get_preset(preset_or_dir))
    if num_layers is not None:
        keep_layers(model, num_layers)
    return (model.to(dtype) if dtype else model).eval()


def spread_norms(model: MobileVLM, seed: int) -> MobileVLM:
    """Norm weights 1 + 0.1·N(0, 1) and biases 0.1·N(0, 1), in place. A fresh model's are exactly 1 and 0, so
    a parity check on random weights cannot see a norm that is dropped, swapped or read from the wrong layer
    (an export's name table, a checkpoint's mapping); a trained model's never are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.split(".")[-2] or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return model


# ---- saving ------------------------------------------------------------------------------------
def save_model(model: MobileVLM, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
               extra_files: dict[str, bytes] | None = None, state: dict[str, torch.Tensor] | None = None,
               merge: bool = False) -> Path:
    """Write `model` as an mtgv directory (safetensors, sharded past 2 GiB), atomically: staged in a temp
    folder beside it, then renamed. A full disk is one DiskFull naming the file (under `out_dir`) that
    did not fit, and leaves `out_dir` as it was. Files and folders get the modes the umask gives.

    state: the weights to write under our names (default model.state_dict(); a sharded run passes the
    gathered full state). merge: see `publish_dir`.
    """
    out_dir = Path(out_dir)
    tmp = staged_dir(out_dir)

    def write(name: str, data: str | bytes) -> None:  # a full disk names the file where it was going
        with writing(out_dir / name):
            (tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)

    try:
        config = model.config
        mtgv = config.to_mtgv_dict()
        v = config.vision
        (tmp / VISION_DIR).mkdir()
        write(f"{VISION_DIR}/config.json", to_clip_config(v).to_json_string())
        write(f"{VISION_DIR}/preprocessor_config.json", json.dumps(preprocessor_dict(v), indent=2))
        if BUILTIN_VISION_TOWERS.get(config.vision_tower) != _without_select(v):
            mtgv["mm_vision_tower"] = VISION_DIR
        if dtype is not None:
            mtgv["torch_dtype"] = str(dtype).removeprefix("torch.")
        write("config.json", json.dumps(mtgv, indent=2))
        state = {to_mtgv_name(k): (t.to(dtype) if dtype else t).detach().contiguous().cpu()
                 for k, t in (state if state is not None else model.state_dict()).items()}
        _save_sharded(state, tmp, out_dir)
        if tokenizer is not None:
            from .tokenizer import save_tokenizer

            with writing(out_dir / "tokenizer.model"):
                save_tokenizer(tokenizer, tmp)
        for name, data in (extra_files or {}).items():
            write(name, data)
        publish_dir(tmp, out_dir, merge)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def weights_digest(ckpt_dir: str | Path) -> str:
    """sha256 over a checkpoint's weight files (names and bytes): which trained model a result came from."""
    h = hashlib.sha256()
    for f in _weight_files(Path(ckpt_dir)):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fp:
            for chunk in iter(lambda: fp.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def _without_select(v: VisionConfig) -> VisionConfig:
    return dataclasses.replace(v, select_layer=VisionConfig.select_layer)


def _save_sharded(state: dict[str, torch.Tensor], out: Path, final: Path) -> None:
    """Write `state` into the staged folder `out` (one file, or shards + index past SHARD_BYTES); a full
    disk is a DiskFull naming the file under its `final` folder."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                             for i in range(1, len(shards) + 1)]
    for fname, shard in zip(names, shards):
        with writing(final / fname):
            save_file(shard, str(out / fname), metadata={"format": "pt"})
        apply_umask(out / fname)
    if len(shards) == 1:
        return
    weight_map = {k: fname for fname, shard in zip(names, shards) for k in shard}
    total = sum(t.numel() * t.element_size() for t in state.values())
    with writing(final / "model.safetensors.index.json"):
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
