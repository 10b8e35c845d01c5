"""The training config: one typed dataclass, read from YAML, overridden with `key=value`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..errors import ConfigError

METHODS = ("alignkd", "baseline", "logit-kd")


@dataclass
class TrainConfig:
    """Everything a training run needs. Every field can be set in YAML or as `key=value`."""

    method: str = "alignkd"
    """alignkd (CE + KD + L_att + L_v) | logit-kd (CE + KD) | baseline (CE only, no teacher)."""
    student: str = "tiny-student"
    """Student: a preset (random init) or an mtgv checkpoint directory (MobileVLM_V2-1.7B)."""
    teacher: str | None = None
    """Teacher mtgv checkpoint directory (MobileVLM_V2-7B); required unless method=baseline."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the student's directory, or the packaged tiny tokenizer for tiny presets."""
    init_vision_from: str | None = None
    """Copy the (frozen) vision tower from this checkpoint into the student, e.g. the teacher's."""
    train_vision_tower: bool = False
    """Unfreeze the CLIP tower (off in MobileVLM V2 and Align-KD; the easy-vqa demo's teacher uses it)."""
    data: str = "easyvqa"
    """"easyvqa" (embedded default) or a LLaVA-format JSON file."""
    image_folder: str | None = None
    """Folder the JSON's image paths are relative to (default: the JSON's folder)."""
    template: str = "v1"
    """Conversation template: v1 (fine-tune) or plain (pretraining captions)."""
    max_length: int | None = None
    """Max positions per sample, image tokens included (default: the student's context). Longer samples are dropped and counted."""
    train_limit: int | None = None
    """Use only this many training samples (seeded choice); None = all."""
    on_malformed: str = "fail"
    """A malformed JSON entry: fail (naming its index) or skip (and count)."""
    output_dir: str = "runs/train"
    """Where the final student (mtgv), adapters, metrics, plots and checkpoints go."""

    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 16
    """Samples per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-5
    """Peak learning rate of the LM (and the loss adapters)."""
    projector_lr: float | None = None
    """Peak learning rate of the projector (default: lr)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_ratio: float = 0.03
    """Fraction of steps of linear warmup before the cosine decay."""
    min_lr_ratio: float = 0.0
    """Cosine decays to lr × this."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    seed: int = 0
    """Seeds init, data order and sampling."""

    kd_weight: float = 1.0
    """λ_kd (ignored by baseline)."""
    att_weight: float = 1.0
    """λ_att (alignkd only)."""
    v_weight: float = 1.0
    """λ_v (alignkd only)."""
    temperature: float = 1.0
    """KD temperature."""
    kd_positions: str | None = None
    """KD positions: text (answer tokens, default for the paper variant) | tokens | all (the release's)."""
    top_k: int = 16
    """V-focus: vision tokens the teacher's text attends to most."""
    variant: str = "paper"
    """paper | release (the public code's computation, for ablation)."""

    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32. Master weights stay fp32."""
    teacher_dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32."""
    gradient_checkpointing: bool = False
    """Recompute LM activations in backward to save memory."""
    deterministic: bool = False
    """Deterministic GPU kernels (torch.use_deterministic_algorithms, cuBLAS workspace config): a resumed
    run then repeats the uninterrupted one bit for bit on any GPU (on CPU it always does; on one H200 eager
    runs already did). Can be slower."""
    compile: bool = False
    """torch.compile each transformer block (LM layers except layer 0, whose attention Align-KD reads, and
    the CLIP layers) of the student and the teacher. On GPU this fuses the norms, rotary and activation
    ops and cuts kernel launches (benchmarks/train_step.py measures it); the first steps pay the compile."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    log_every: int = 1
    """Steps between metric lines."""
    resume: bool = True
    """Continue from the newest checkpoint in output_dir if there is one."""
    progress: bool = True
    """Show a progress bar."""
    num_workers: int = 0
    """DataLoader worker processes (images are decoded there)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "baseline" and not self.teacher:
            raise ConfigError(f"method {self.method} needs a teacher (teacher=DIR)")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.on_malformed not in ("fail", "skip"):
            raise ConfigError(f"on_malformed must be fail or skip, got {self.on_malformed!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


def _coerce(name: str, raw: Any, typ: Any) -> Any:
    """YAML already typed values; `key=value` strings are parsed as YAML scalars, then checked."""
    value = yaml.safe_load(raw) if isinstance(raw, str) else raw
    allowed = getattr(typ, "__args__", (typ,))
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if str in allowed and not isinstance(value, str):
        return str(raw)
    for t in allowed:
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    raise ConfigError(f"{name}: {raw!r} is not a valid {typ}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls: type = None,
                **defaults):
    """Defaults ← YAML file ← `key=value` overrides → a `cls` (TrainConfig); unknown keys are one clear error."""
    cls = cls or TrainConfig
    values: dict[str, Any] = dict(defaults)
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        values.update(loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        values[k.strip()] = v
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
