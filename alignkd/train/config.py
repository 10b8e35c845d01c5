"""The training config: typed dataclasses with a docstring per field, read from YAML and `key=value`.

Groups nest: `data.path=x.json`, `loss.temperature=2` (in YAML a `data:` / `loss:` mapping). The loss
group is the distillation module's own `AlignKDLossConfig`; the method picks which of its terms are on.
Every value is checked when the config is built, before any model is loaded: a bad key, type or range
is one `ConfigError` naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..data.datasets import read_text
from ..data.templates import TEMPLATES
from ..distill import AlignKDLossConfig
from ..errors import ConfigError, shown
from ..model.config import PRESETS

METHODS = ("alignkd", "baseline", "logit-kd")
PRECISIONS = ("auto", "bf16", "fp32")
TEACHER_DTYPES = ("auto", "bf16", "fp16", "fp32")
# How a run is executed or reported, not what it computes: a resume may change these.
RUN_INDEPENDENT = ("output_dir", "progress", "log_every", "save_every", "keep_last", "resume", "compile",
                   "gradient_checkpointing", "deterministic", "num_workers", "vision_feature_memo_gb")


# Upper bounds of counts whose excess is never meant and costs before any step: a micro-batch's index list is
# built in memory (10**12 samples never reached step 1), and seeds go to torch.manual_seed (64 bits, and the
# teacher's is seed + 1).
MAX_BATCH = 2**16
MAX_SEED = 2**32 - 1
MAX_STEPS = 10**9  # 10**400 passed and overflowed the warmup's float


def max_workers() -> int:
    """DataLoader workers beyond 4 per CPU only fork processes (300 were forked for a 4-sample run)."""
    return 4 * (os.cpu_count() or 1)


def check_values(obj: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 fractions: tuple[str, ...] = (), choices: Mapping[str, tuple] | None = None,
                 at_most: Mapping[str, float] | None = None) -> None:
    """Range and choice checks of a config dataclass (None = unset, allowed); every float must be finite."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name} must be a finite number, got {v}")
    for names, ok, want in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (fractions, lambda v: 0 <= v <= 1, "between 0 and 1")):
        for name in names:
            v = getattr(obj, name)
            if v is not None and not ok(v):
                raise ConfigError(f"{name} must be {want}, got {shown(v)}")
    for name, most in (at_most or {}).items():
        v = getattr(obj, name)
        if v is not None and v > most:
            raise ConfigError(f"{name} must be at most {most}, got {shown(v)}")
    for name, allowed in (choices or {}).items():
        if getattr(obj, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {shown(getattr(obj, name))}")


@dataclass
class DataConfig:
    """The training samples: which file, how they are turned into token ids, which are kept."""

    path: str = "easyvqa"
    """"easyvqa" (embedded default) or a LLaVA-format JSON file (e.g. llava_v1_5_mix665k.json)."""
    image_folder: str | None = None
    """Folder the JSON's image paths are relative to (default: the JSON's folder)."""
    template: str = "v1"
    """Conversation template: v1 (fine-tune) or plain (pretraining captions)."""
    max_length: int | None = None
    """Max positions per sample, image tokens included (default: the student's context). Longer samples are dropped and counted."""
    limit: int | None = None
    """Use only this many samples (a seeded choice); None = all."""
    on_malformed: str = "fail"
    """An unusable entry (bad fields, missing or undecodable image): fail (naming it) or skip (and count)."""

    def __post_init__(self) -> None:
        check_values(self, positive=("max_length", "limit"),
                     choices={"template": tuple(TEMPLATES), "on_malformed": ("fail", "skip")})
        _expand_home(self, DATA_PATH_KEYS)


@dataclass
class TrainConfig:
    """Everything a training run needs. Every field can be set in YAML or as `key=value`."""

    method: str = "alignkd"
    """alignkd (CE + KD + L_att + L_v) | logit-kd (CE + KD) | baseline (CE only, no teacher)."""
    student: str = "tiny-student"
    """Student: a preset (random init) or an mtgv checkpoint directory (MobileVLM_V2-1.7B)."""
    teacher: str | None = None
    """Teacher mtgv checkpoint directory (MobileVLM_V2-7B) or preset; required unless method=baseline (which ignores it)."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the student's directory, or the packaged tiny tokenizer for tiny presets."""
    init_vision_from: str | None = None
    """Copy the (frozen) vision tower from this checkpoint into the student, e.g. the teacher's."""
    train_vision_tower: bool = False
    """Unfreeze the student's CLIP tower (off in MobileVLM V2 and Align-KD). The teacher's stays frozen and
    then runs its own vision forward."""
    output_dir: str = "runs/train"
    """Where the final student (mtgv), adapters, metrics, plots and checkpoints go."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training samples (data.path, data.image_folder, ...)."""

    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 16
    """Samples per micro-batch per process (at most 65536, as grad_accum)."""
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
    """Seeds init, data order and sampling (0 to 2**32 - 1)."""
    loss: AlignKDLossConfig = field(default_factory=AlignKDLossConfig)
    """The distillation loss (loss.temperature, loss.kd_positions, ...). The method picks the terms: baseline
    uses none of it, logit-kd only loss.kd_weight, temperature, kd_positions, kd_topk and kd_tail; a weight
    of 0 turns a term off (alignkd with loss.v_weight=0 is KD + L_att)."""
    teacher_cache: str | None = None
    """Folder of an offline teacher cache (`alignkd-mobile teacher-cache` with this config): logit KD reads
    the teacher's top-k log-probs there instead of running the teacher. L_att and L_v still run the teacher,
    but only its projector, embeddings and layer 0's attention map (its other tensors are never read); logit-kd
    loads no teacher at all. The cache must have been made by `teacher` with this run's loss.kd_topk (null:
    whatever k it was built with; a build without loss.kd_topk keeps the top 32), loss.temperature,
    loss.kd_positions (text or tokens) and data.template, and hold every training sample. Unused by
    method=baseline."""
    teacher_cache_missing: str = "fail"
    """A training sample that teacher_cache does not hold: fail (one error, with the count and an example,
    before any step) or skip (the sample is dropped from training and counted)."""

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
    num_workers: int = 0
    """DataLoader worker processes that decode and preprocess the images (0 = in the training process; at
    most 4 per CPU of the machine)."""
    vision_feature_memo_gb: float = 0.0
    """Keep the frozen vision tower's features of each image, once computed, in up to this many GiB (on the
    training device) and reuse them whenever the same pixels come again: in later epochs, and in later
    runs of this process with the same tower (the demo's students). 0 = off. Worth it on small datasets
    trained for many epochs; an image's features take 576 × 1024 × 2 B ≈ 1.2 MB at real shapes (bf16).
    Needs a frozen tower (train_vision_tower false)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only the final step, which is always checkpointed)."""
    keep_last: int = 2
    """Checkpoints kept."""
    log_every: int = 1
    """Steps between metric lines."""
    resume: bool = True
    """Continue from the newest checkpoint in output_dir. A checkpoint of a run with other settings is
    refused, naming them. false: start from step 0, deleting output_dir's earlier checkpoints and metrics."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        _expand_home(self, PATH_KEYS)
        check_values(self, positive=("steps", "batch_size", "grad_accum", "lr", "projector_lr", "keep_last",
                                     "log_every"),
                     non_negative=("weight_decay", "max_grad_norm", "seed", "num_workers", "save_every",
                                   "vision_feature_memo_gb"),
                     fractions=("warmup_ratio", "min_lr_ratio"),
                     choices={"method": METHODS, "precision": PRECISIONS, "teacher_dtype": TEACHER_DTYPES,
                              "teacher_cache_missing": ("fail", "skip")},
                     at_most={"steps": MAX_STEPS, "batch_size": MAX_BATCH, "grad_accum": MAX_BATCH, "seed": MAX_SEED,
                              "num_workers": max_workers()})
        if self.method != "baseline" and not self.teacher:
            raise ConfigError(f"method {self.method} needs a teacher (teacher=DIR or --teacher DIR)")
        if self.vision_feature_memo_gb and self.train_vision_tower:
            raise ConfigError("vision_feature_memo_gb needs a frozen vision tower: train_vision_tower is true")
        if self.teacher_cache and self.method != "baseline" and self.loss.kd_positions == "all":
            raise ConfigError("teacher_cache needs loss.kd_positions text or tokens: 'all' (the release variant's) "
                              "also scores padding positions, which depend on the batch a sample is drawn in")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------------------------- reading
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_name(typ: Any) -> str:
    allowed = getattr(typ, "__args__", (typ,))
    names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in allowed if t is not type(None))
    return names + (" or null" if type(None) in allowed else "")


def _coerce(name: str, raw: Any, typ: Any) -> Any:
    """YAML already typed values; `key=value` strings are parsed as YAML scalars, then checked."""
    try:
        value = yaml.safe_load(raw) if isinstance(raw, str) else raw
    except yaml.YAMLError:
        value = raw
    except ValueError as e:  # a date that is none (2026-13-45), or an integer past Python's int-string limit
        if _TOO_MANY_DIGITS not in str(e):
            value = raw
        else:
            raise ConfigError(f"{name}: a value of {len(raw)} characters is beyond any setting") from None
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
    if str in allowed and isinstance(value, (str, int, float, bool)):
        return raw if isinstance(raw, str) else str(value)
    for t in allowed:
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    if isinstance(raw, str) and not raw.strip():  # `method=`: no value at all
        raise ConfigError(f"{name} is empty: it needs {_type_name(typ)}")
    if value is None:  # `output_dir: ~` is YAML's null, not the home folder
        raise ConfigError(f"{name} has no value (YAML reads ~, null and nothing as none): it needs {_type_name(typ)}"
                          + ("; quote '~/...' for a path in the home folder" if str in allowed else ""))
    raise ConfigError(f"{name}: {shown(raw)} is not {_type_name(typ)}")


_TOO_MANY_DIGITS = "integer string conversion"  # Python's ValueError past its int-string limit (4,300 digits)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently: a config that sets lr twice trains with whichever
    came last. Here a mapping that names a key twice is a YAML error at the second one."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden, as YAML intends
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class names it
                continue
            if seen is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} appears twice (first at line {seen.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    text = read_text(Path(path), "config file", "YAML", ConfigError)
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{path} is not valid YAML{where}: {what}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except ValueError as e:  # a date that is none (2026-13-45), or an integer past Python's int-string limit
        if _TOO_MANY_DIGITS in str(e):
            raise ConfigError(f"{path}: holds an integer of over 4,300 digits, beyond any setting") from None
        raise ConfigError(f"{path}: a value cannot be read: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
    return loaded


KEYS_COMMAND = "alignkd-mobile train-keys"


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    if not all(key.split(".")):  # "", ".steps", "data..path"
        raise ConfigError(f"config key {shown(key)} is not a key: KEY or GROUP.KEY ({KEYS_COMMAND} lists them)")
    *groups, leaf = key.split(".")
    node = tree
    for i, g in enumerate(groups):
        node = node.setdefault(g, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(groups[:i + 1])} is set to a single value, so {key} cannot be set")
    node[leaf] = value


def _build(cls: type, values: Any, prefix: str = "") -> Any:
    names = [f.name for f in fields(cls)]
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix[:-1]} is a group of keys ({', '.join(prefix + n for n in names)}): "
                          f"set them as {prefix}KEY=VALUE (in YAML, a mapping)")
    unknown = sorted((str(k) for k in set(values) - set(names)), key=str)  # YAML keys may be true, 1, null
    if unknown:
        hints = {k.rsplit(".", 1)[-1]: k for k, _, _ in config_keys(cls, prefix)}
        said = ", ".join(prefix + k + (f" (did you mean {hints[k]}?)" if k in hints else "") for k in unknown)
        raise ConfigError(f"unknown config key(s) {said}; {getattr(cls, 'KEYS_COMMAND', KEYS_COMMAND)} lists them")
    hints = get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        kwargs[k] = _build(hints[k], v, f"{prefix}{k}.") if is_dataclass(hints[k]) else _coerce(prefix + k, v, hints[k])
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if not prefix:
            raise
        raise ConfigError(f"{prefix[:-1]}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls: type = TrainConfig,
                flags: Mapping[str, Any] | None = None):
    """Defaults ← YAML file ← `flags` (command-line options, dotted keys) ← `key=value` overrides → `cls`,
    every value checked. Unknown keys, bad types and out-of-range values are one ConfigError each."""
    tree: dict[str, Any] = _read_yaml(path) if path is not None else {}
    for k, v in (flags or {}).items():
        _set(tree, k, v)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {shown(item)} is not key=value")
        k, v = item.split("=", 1)
        _set(tree, k.strip(), v)
    return _build(cls, tree)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (litgpt style), read from its source."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: inspect.cleandoc(nxt.value.value) for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def config_keys(cls: type = TrainConfig, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, default, docstring) of every settable key, groups expanded."""
    docs, hints = _field_docs(cls), get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            yield from config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f.default, docs.get(f.name, "")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {prefix + k: v})
    return out


PATH_KEYS = ("student", "teacher", "tokenizer", "init_vision_from", "output_dir", "teacher_cache")
DATA_PATH_KEYS = ("path", "image_folder")


def _expand_home(cfg: Any, keys: tuple[str, ...]) -> None:
    """`~/data` in a YAML config means the home folder, as the shell would read it (else a folder named `~`)."""
    for k in keys:
        v = getattr(cfg, k)
        if isinstance(v, str) and v.startswith("~"):
            setattr(cfg, k, os.path.expanduser(v))


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """cfg with its folder and file settings made absolute (presets and the embedded "easyvqa" kept): what a
    run records, and how two runs' settings are compared. A resume from another folder reads a relative
    `data.path` elsewhere, which is another run's data; the same file named absolutely is the same run's."""
    def absolute(v: str | None, special: tuple[str, ...]) -> str | None:
        return v if v is None or v in special else os.path.abspath(v)

    presets = tuple(PRESETS)
    data = dataclasses.replace(cfg.data, path=absolute(cfg.data.path, ("easyvqa",)),
                               image_folder=absolute(cfg.data.image_folder, ()))
    return dataclasses.replace(cfg, data=data, **{k: absolute(getattr(cfg, k), presets) for k in PATH_KEYS})


def run_settings(cfg: TrainConfig, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flat settings that decide what a run computes (what a resumed run must share): everything but
    RUN_INDEPENDENT (except those named in `also`) and what the method does not use."""
    flat = flatten(with_absolute_paths(cfg).to_dict())
    unused: set[str] = set(RUN_INDEPENDENT) - set(also)
    if cfg.method == "baseline":
        unused |= {"teacher", "teacher_cache", "teacher_cache_missing"} | {k for k in flat if k.startswith("loss.")}
    elif cfg.method == "logit-kd":
        unused |= {"loss.att_weight", "loss.v_weight", "loss.top_k"}
    return {k: v for k, v in flat.items() if k not in unused}


def run_differences(recorded: Mapping[str, Any], cfg: TrainConfig, also: tuple[str, ...] = ()) -> list[str]:
    """`key: recorded → now` for each setting (of `run_settings`) in which `cfg` differs from a recorded config."""
    try:
        old = _build(TrainConfig, dict(recorded))
    except ConfigError as e:
        return [f"(the recorded config is not one this version reads: {e})"]
    a, b = run_settings(old, also), run_settings(cfg, also)
    return [f"{k}: {a[k]!r} → {b[k]!r}" for k in a if k in b and a[k] != b[k]]
