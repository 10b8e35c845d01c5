"""The training recipe — setup, train, save — for Align-KD, logit-KD and the undistilled baseline.

One process or many (`torchrun --nproc_per_node=N`, FSDP2): the student's decoder layers and the
student itself are `fully_shard`-ed, the trainable loss adapters are sharded with them, and the frozen
teacher is *replicated* on every rank (forward under no_grad; a 7B teacher in bf16 is 14 GB, which fits
beside a sharded 1.7B student). Every rank reads its own slice of each global batch.

Losses are means per micro-batch, averaged over micro-batches and ranks (as torchtune/HF do without token
normalisation); so N ranks × batch b equal one process with grad_accum N × batch b, exactly.

Data order is a function of the step (a seeded permutation per epoch), so resuming needs only the step:
a run killed and resumed logs the same losses as the uninterrupted run. A checkpoint records its run's
config; resuming one whose settings differ is refused, naming them. The final step is always checkpointed,
after the final student is written (the one output that must survive a full disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm

from ..data.datasets import VQADataset, collate, easyvqa_dataset, llava_json_dataset
from ..data.image import image_config
from ..distill import (LOSS_TERMS, AlignKDLoss, AlignKDLossConfig, DistillInputs, capture_layer0_attention,
                       kd_positions_mask, layer0_attention)
from ..errors import AlignKDError, CheckpointError, ConfigError
from ..figures import can_draw
from ..fileio import DiskFull, FolderLock, OutputPathError, atomic_write, check_output_dir, remove_stale_temps, writing
from ..model.checkpoint import (build_model, config_from_name, keep_attention_map_inputs, load_model, read_mtgv_state_dict,
                                save_model)
from ..model.config import PRESETS, MobileVLMConfig
from ..model.mobilevlm import MobileVLM, first_text_after_image
from ..model.tokenizer import check_tokenizer_matches, load_tokenizer, tiny_tokenizer_dir
from ..model.vision import attach_feature_memo
from .card import model_card
from .config import TrainConfig, dump_config, run_differences, with_absolute_paths
from .teacher_cache import (DEFAULT_CACHE_K, CacheError, CacheSpec, CacheWriter, TeacherCache, build, check_folder,
                            dataset_keys, discard_replaced, exclusive, finalize, foreign_entries, pending,
                            planned_size, recorded_k, restore, set_aside, teacher_fingerprint)

class TrainingDiverged(AlignKDError):
    """A loss term became NaN or inf; the last good checkpoint is kept."""


@dataclass
class Run:
    """What `setup` builds and the loop uses."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    tokenizer: Any
    student: nn.Module  # MobileVLM, possibly fully_shard-ed
    teacher: MobileVLM | None
    loss_fn: AlignKDLoss
    dataset: VQADataset
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    shared_vision: bool
    autocast_dtype: torch.dtype | None
    step: int = 0
    history: list[dict] = field(default_factory=list)
    batches: Iterator[dict] | None = None  # micro-batches from `step` on, made on the first train_step
    cache: TeacherCache | None = None  # teacher_cache: the logit-KD side of the teacher
    cache_keys: list[bytes] | None = None  # the cache key of each dataset sample
    cache_skipped: int = 0  # samples dropped because the cache lacks them (teacher_cache_missing=skip)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ============================================================================ setup
def _dist_init() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _tokenizer_for(cfg: TrainConfig):
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.student in PRESETS:
        if not cfg.student.startswith("tiny"):
            raise ConfigError(f"preset {cfg.student} has no packaged tokenizer: pass tokenizer=DIR")
        return load_tokenizer(tiny_tokenizer_dir())
    _check_model_name("student", cfg.student)  # before its tokenizer is looked for there
    return load_tokenizer(cfg.student)


def _check_model_name(key: str, value: str) -> None:
    if value not in PRESETS and not Path(value).is_dir():
        raise ConfigError(f"{key}={value}: neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")


def _model_config(key: str, value: str) -> MobileVLMConfig:
    _check_model_name(key, value)
    return config_from_name(value)


def _check_models(cfg: TrainConfig, tokenizer) -> tuple[MobileVLMConfig, MobileVLMConfig | None]:
    """The configs of the models this run loads, checked against each other and the tokenizer before any
    weights are read: a wrong path, vocabulary or vision tower is one error up front."""
    student = _model_config("student", cfg.student)
    check_tokenizer_matches(tokenizer, student.text.vocab_size, student.text.bos_token_id,
                            student.text.eos_token_id, where=f"student {cfg.student}")
    if cfg.init_vision_from and _model_config("init_vision_from", cfg.init_vision_from).vision != student.vision:
        raise ConfigError(f"init_vision_from={cfg.init_vision_from}: its vision tower differs from the student's")
    if cfg.method == "baseline":
        return student, None
    teacher = _model_config("teacher", cfg.teacher)
    if teacher.text.vocab_size != student.text.vocab_size:
        raise ConfigError(f"teacher vocabulary ({teacher.text.vocab_size}) differs from the student's "
                          f"({student.text.vocab_size}): logit KD needs one tokenizer")
    if teacher.num_image_tokens != student.num_image_tokens:
        raise ConfigError(f"teacher {cfg.teacher} has {teacher.num_image_tokens} image tokens, the student "
                          f"{student.num_image_tokens}: KD and L_att compare the two layouts position by position")
    if cfg.loss.kd_topk is not None and cfg.loss.kd_topk > teacher.text.vocab_size:
        raise ConfigError(f"loss.kd_topk={cfg.loss.kd_topk} is larger than the vocabulary ({teacher.text.vocab_size})")
    check_tokenizer_matches(tokenizer, teacher.text.vocab_size, teacher.text.bos_token_id,
                            teacher.text.eos_token_id, where=f"teacher {cfg.teacher}")
    return student, teacher


def _load_student(cfg: TrainConfig) -> MobileVLM:
    student = build_model(cfg.student, seed=cfg.seed, dtype=torch.float32)  # fp32 master weights
    if cfg.init_vision_from:
        student.vision_tower.load_state_dict(load_model(cfg.init_vision_from).vision_tower.state_dict())
    student.vision_tower.requires_grad_(cfg.train_vision_tower)
    return student


def _teacher_seed(cfg: TrainConfig) -> int:
    return cfg.seed + 1  # a preset teacher's random weights


def _load_teacher(cfg: TrainConfig, num_layers: int | None = None) -> MobileVLM:
    """The frozen teacher (eval, no grad); num_layers: only that prefix (`keep_layers`)."""
    teacher = build_model(cfg.teacher, seed=_teacher_seed(cfg), num_layers=num_layers)
    return teacher.requires_grad_(False).eval()


def _same_vision_tower(a: MobileVLM, b: MobileVLM) -> bool:
    """Teacher and student usually share one frozen CLIP: then one vision forward serves both."""
    if a.config.vision != b.config.vision:
        return False
    sb = b.vision_tower.state_dict()
    return all(torch.equal(v.float().cpu(), sb[k].float().cpu()) for k, v in a.vision_tower.state_dict().items())


def build_dataset(cfg: TrainConfig, tokenizer, student_cfg: MobileVLMConfig) -> VQADataset:
    """The run's samples (`cfg.data`), tokenized for the student, every image checked."""
    data = cfg.data
    max_len = data.max_length or student_cfg.text.max_position_embeddings
    img = image_config(student_cfg)
    if data.path == "easyvqa":
        return easyvqa_dataset("train", tokenizer, img, max_len, student_cfg.num_image_tokens, data.template,
                               limit=data.limit, seed=cfg.seed)
    ds = llava_json_dataset(data.path, data.image_folder, tokenizer, data.template, img, max_len,
                            student_cfg.num_image_tokens, data.on_malformed)
    if data.limit is not None and data.limit < len(ds.samples):
        keep = sorted(random.Random(cfg.seed).sample(range(len(ds.samples)), data.limit))
        ds.samples = [ds.samples[i] for i in keep]
    return ds


def cache_spec(cfg: TrainConfig, teacher_cfg: MobileVLMConfig, building: bool = False) -> CacheSpec:
    """What a teacher cache for this run must have been made with (`teacher` is the identity of cfg.teacher:
    its config and weights, or a preset and its seed). k is loss.kd_topk; unset, a build takes DEFAULT_CACHE_K
    and a run the k its cache was built with."""
    teacher = ({"preset": cfg.teacher, "seed": _teacher_seed(cfg)} if cfg.teacher in PRESETS
               else teacher_fingerprint(cfg.teacher))
    vocab = teacher_cfg.text.vocab_size
    k = cfg.loss.kd_topk or (None if building else recorded_k(cfg.teacher_cache)) or min(DEFAULT_CACHE_K, vocab)
    return CacheSpec(teacher=teacher, k=k, temperature=cfg.loss.temperature,
                     kd_positions=cfg.loss.kd_positions, template=cfg.data.template, vocab_size=vocab)


def _open_cache(cfg: TrainConfig, dataset: VQADataset, teacher_cfg: MobileVLMConfig,
                ) -> tuple[TeacherCache, VQADataset, list[bytes], int]:
    """The run's teacher cache, checked (spec, completeness, shards) and holding every training sample; with
    teacher_cache_missing=skip, the samples it lacks are dropped. Returns (cache, dataset, keys, dropped)."""
    cache = TeacherCache(cfg.teacher_cache, cache_spec(cfg, teacher_cfg))
    keys = dataset_keys(dataset, cfg.data.template)
    missing = [i for i, key in enumerate(keys) if key not in cache]
    if not missing:
        return cache, dataset, keys, 0
    first = dataset.samples[missing[0]]
    example = f"sample {missing[0]}" + (f" (image {first['image']})" if first["image"] is not None else "")
    if cfg.teacher_cache_missing == "fail" or len(missing) == len(keys):
        raise CacheError(f"teacher cache {cfg.teacher_cache} lacks {len(missing)} of the {len(keys)} training samples, "
                         f"e.g. {example}: build it for this data (alignkd-mobile teacher-cache with this config)"
                         + ("" if len(missing) == len(keys) else ", or set teacher_cache_missing=skip to drop them"))
    gone = set(missing)
    kept = [i for i in range(len(keys)) if i not in gone]
    # a new dataset: the one given may be shared (easy-vqa's is kept per process)
    subset = VQADataset([dataset.samples[i] for i in kept], dataset.image_cfg, dataset.stats)
    return cache, subset, [keys[i] for i in kept], len(missing)


def loss_config(cfg: TrainConfig) -> AlignKDLossConfig:
    """`cfg.loss` with the terms the method does not use switched off."""
    off = {"baseline": ("kd_weight", "att_weight", "v_weight"), "logit-kd": ("att_weight", "v_weight"),
           "alignkd": ()}[cfg.method]
    return dataclasses.replace(cfg.loss, **dict.fromkeys(off, 0.0))


def make_loss(cfg: TrainConfig, student: MobileVLM, teacher: MobileVLM | None) -> AlignKDLoss:
    """The method's loss terms and weights; its adapters are sized from the two models."""
    loss_cfg = loss_config(cfg)
    ref = teacher or student
    # The head adapter maps any head count (also fewer teacher heads than student heads).
    return AlignKDLoss(loss_cfg, ref.config.text.num_heads, student.config.text.num_heads,
                       ref.config.text.hidden_size, student.config.text.hidden_size)


def compile_blocks(*models: nn.Module | None) -> None:
    """torch.compile every transformer block in place (module names, hence checkpoints, unchanged), except
    LM layer 0: the layer-0 capture hooks its q/k projections and must see them run eagerly. None is skipped."""
    for model in filter(None, models):
        for i, layer in enumerate(model.lm.model.layers):
            if i:
                layer.compile()
        for layer in model.vision_tower.vision_tower.encoder.layers if model.vision_tower is not None else []:
            layer.compile()


def make_optimizer(student: nn.Module, loss_fn: nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW over `_param_groups`; the fused kernel on CUDA (one launch for every tensor, not one per op)."""
    return torch.optim.AdamW(_param_groups(student, loss_fn, cfg), betas=(0.9, 0.999), eps=1e-8,
                             fused=device.type == "cuda")


def _param_groups(student: nn.Module, loss_fn: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: LM, projector (its own lr), adapters; no weight decay on biases and norms."""
    groups: dict[tuple[str, bool], list] = {}
    for prefix, module in (("student", student), ("adapters", loss_fn)):
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            part = "projector" if "mm_projector" in name else ("adapters" if prefix == "adapters" else "lm")
            groups.setdefault((part, p.ndim >= 2), []).append(p)
    lrs = {"lm": cfg.lr, "adapters": cfg.lr, "projector": cfg.projector_lr or cfg.lr}
    return [{"params": ps, "lr": lrs[part], "weight_decay": cfg.weight_decay if decay else 0.0, "name": f"{part}"}
            for (part, decay), ps in sorted(groups.items())]


def _cosine(cfg: TrainConfig):
    warm = int(round(cfg.warmup_ratio * cfg.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, cfg.steps - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _shard(student: MobileVLM, loss_fn: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    # The step calls the vision tower and the projector directly (one CLIP forward shared with the
    # teacher), so each is its own unit; then every decoder layer; the root holds embeddings/norm/head.
    fully_shard(student.vision_tower)
    fully_shard(student.mm_projector)
    for layer in student.lm.model.layers:
        fully_shard(layer)
    fully_shard(student)
    if any(p.requires_grad for p in loss_fn.parameters()):
        fully_shard(loss_fn)


def setup(cfg: TrainConfig) -> Run:
    """Everything a run needs, checked in order of cost: the checkpoint to resume (same run?), the model
    configs and tokenizer, the samples and images, then the weights."""
    rank, world, device = _dist_init()
    _check_output_dir(cfg)
    resume_from = _resume_point(cfg, world)
    if cfg.deterministic:
        # atomics in GPU backward kernels (embedding, attention) sum in a different order on each run
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    tokenizer = _tokenizer_for(cfg)
    student_cfg, teacher_cfg = _check_models(cfg, tokenizer)
    dataset = build_dataset(cfg, tokenizer, student_cfg)  # bad samples and images fail before any weights load
    cache, keys, skipped = None, None, 0
    if cfg.teacher_cache and cfg.method != "baseline":  # a bad cache fails before any weights load too
        cache, dataset, keys, skipped = _open_cache(cfg, dataset, teacher_cfg)
    student = _load_student(cfg)
    teacher, terms = None, loss_config(cfg)
    if cfg.method != "baseline" and (cache is None or terms.att_weight > 0 or terms.v_weight > 0):
        # with a cache the alignment terms need the teacher's layer-0 attention map and nothing after it
        teacher = _load_teacher(cfg, num_layers=1 if cache is not None else None)
        if cache is not None:  # nor the rest of layer 0: its values, output projection and MLP never run
            keep_attention_map_inputs(teacher)
    # a student CLIP that trains no longer computes the teacher's features
    shared = teacher is not None and not cfg.train_vision_tower and _same_vision_tower(student, teacher)
    if shared:  # the student's CLIP forward serves both: the teacher's copy of the tower never reaches the device
        teacher.vision_tower = None

    loss_fn = make_loss(cfg, student, teacher)

    student.to(device)
    loss_fn.to(device)
    if cfg.vision_feature_memo_gb:  # before sharding: the digest reads the tower's full weights
        attach_feature_memo(student.vision_tower, int(cfg.vision_feature_memo_gb * 2**30))
    if teacher is not None:
        teacher.to(device=device, dtype=_dtype(cfg.teacher_dtype, device))
    if cfg.compile:
        compile_blocks(student, teacher)
    if cfg.gradient_checkpointing:
        student.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if world > 1:
        _shard(student, loss_fn)
    optimizer = make_optimizer(student, loss_fn, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(cfg))
    autocast = None
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        autocast = torch.bfloat16
    run = Run(cfg, out, device, rank, world, tokenizer, student, teacher, loss_fn, dataset, optimizer, scheduler,
              shared, autocast, cache=cache, cache_keys=keys, cache_skipped=skipped)
    if skipped:
        _log(run, f"teacher cache {cfg.teacher_cache}: {skipped} training sample(s) it lacks are skipped")
    if run.is_main:
        _remove_stale_temps(run)
    if resume_from is not None:
        _load_checkpoint(run, resume_from)
    elif not cfg.resume and run.is_main and checkpoints(out):
        old = checkpoints(out)
        for p in old:
            shutil.rmtree(p)
        _log(run, f"starting fresh: removed {len(old)} checkpoint(s) of an earlier run in {_ckpt_root(run)}")
    return run


def _check_output_dir(cfg: TrainConfig) -> None:
    """Refuse an output_dir that is a file, or that is one of the run's input folders: the trained student's
    config.json and weights are written into it, over the teacher's or the starting student's."""
    out = check_output_dir(cfg.output_dir, "output_dir").resolve()
    for key in ("student", "teacher", "tokenizer", "init_vision_from", "teacher_cache"):
        given = getattr(cfg, key)
        if given and Path(given).is_dir() and Path(given).resolve() == out:
            raise OutputPathError(f"output_dir {cfg.output_dir} is the {key} folder: the trained student would be "
                                  f"written over it; name another folder")


# ============================================================================ the teacher cache
def build_teacher_cache(cfg: TrainConfig, overwrite: bool = False) -> dict:
    """`alignkd-mobile teacher-cache`: run the teacher once over this config's training samples and write their
    top-k log-probs at the KD positions into cfg.teacher_cache, for `train` with the same config. Everything
    is checked before the teacher loads (config, tokenizer, samples and images, a cache there of another run);
    samples already cached are skipped, so a killed build continues, and the teacher is not even loaded when
    nothing is left. Under torchrun the ranks split the samples and rank 0 writes the manifest after all are
    done. overwrite: a cache there of another run is removed instead of refused. Returns the summary
    (samples, KD positions, bytes, bytes per KD position, throughput)."""
    if not cfg.teacher_cache:
        raise ConfigError("teacher-cache needs the cache folder: --output-dir DIR (or teacher_cache=DIR)")
    if cfg.method == "baseline":
        raise ConfigError("method baseline uses no teacher: there is nothing to cache")
    check_output_dir(cfg.teacher_cache, "teacher cache folder")
    if foreign := foreign_entries(Path(cfg.teacher_cache)):  # the teacher's folder, the data's, a user's own
        raise CacheError(f"teacher cache folder {cfg.teacher_cache} holds files that no cache build writes "
                         f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): name a new or empty "
                         f"folder (--overwrite replaces a cache, nothing else)")
    rank, world, device = _dist_init()
    tokenizer = _tokenizer_for(cfg)
    student_cfg, teacher_cfg = _check_models(cfg, tokenizer)
    dataset = build_dataset(cfg, tokenizer, student_cfg)
    spec, root = cache_spec(cfg, teacher_cfg, building=True), Path(cfg.teacher_cache)
    keys = dataset_keys(dataset, cfg.data.template)
    created, aside = rank == 0 and not root.exists(), None
    if rank == 0:
        try:
            check_folder(root, spec)  # a cache of another run is refused here, before anything is written
        except CacheError:
            if not overwrite:
                raise
            aside = set_aside(root)  # removed once the new cache is complete
    if world > 1:
        dist.barrier()
    try:
        summary = _build_cache(cfg, spec, root, dataset, keys, rank, world, device, teacher_cfg.num_image_tokens)
    except BaseException:
        # a build that stopped before its first shard (a teacher that does not load) leaves the folder as it was
        if rank == 0 and not any(root.glob("shard-*")):
            if aside is not None:
                restore(root, aside)
            elif created:
                shutil.rmtree(root, ignore_errors=True)
        raise
    if rank == 0:
        discard_replaced(root)
    return summary


def _say_planned_size(root: Path, dataset, todo: dict, share: int, spec, num_image_tokens: int, world: int) -> None:
    """Before the teacher loads: how much this build will write, and a warning when the disk holds less."""
    rows, need = planned_size(dataset, todo, spec, num_image_tokens)
    whose = f" (rank 0's share of {world} processes)" if world > 1 else ""
    print(f"teacher cache {root}: {len(todo)} samples to compute{whose}" + (f" ({share - len(todo)} already cached)"
          if share > len(todo) else "") + f", {rows} KD positions: about {_size(need)} at k = {spec.k}",
          file=sys.stderr, flush=True)
    free = shutil.disk_usage(root).free
    if need * world > free:
        print(f"warning: {root}'s disk has {_size(free)} free, less than the build needs: it will stop when the disk "
              "is full (finished shards are kept: free space and rerun to continue)", file=sys.stderr, flush=True)


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _build_cache(cfg: TrainConfig, spec, root: Path, dataset, keys, rank: int, world: int, device,
                 num_image_tokens: int) -> dict:
    # rank 0 holds the folder's lock: another build of this cache waits, then finds it done
    with exclusive(root, log=functools.partial(print, file=sys.stderr)) if rank == 0 else contextlib.nullcontext():
        writer = CacheWriter(root, spec, rank)
        todo, share = pending(keys, writer, rank, world)
        teacher = None
        if todo and rank == 0:
            _say_planned_size(root, dataset, todo, share, spec, num_image_tokens, world)
        if todo:
            teacher = _load_teacher(cfg).to(device=device, dtype=_dtype(cfg.teacher_dtype, device))
            if cfg.vision_feature_memo_gb:  # ~10 questions per image in easy-vqa: CLIP runs once per image
                attach_feature_memo(teacher.vision_tower, int(cfg.vision_feature_memo_gb * 2**30))
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        stats = build(teacher, dataset, writer, todo, cfg.batch_size, device, torch.bfloat16 if bf16 else None,
                      cfg.num_workers, cfg.progress and rank == 0, total=share)
        every = [stats]
        if world > 1:
            every = [None] * world
            dist.all_gather_object(every, stats)  # also the barrier: every rank has flushed its shards
        if rank != 0:
            return stats
        m = finalize(root, spec)
    wall = max(r["wall_s"] for r in every)
    computed = sum(r["computed"] for r in every)
    return {"teacher_cache": str(cfg.teacher_cache), "samples": m["samples"], "computed_now": computed,
            "kd_positions": m["rows"], "k": spec.k, "bytes": m["bytes"],
            "bytes_per_kd_position": round(m["bytes"] / m["rows"], 1) if m["rows"] else None,
            "samples_per_s": round(computed / wall, 2) if computed and wall > 0 else None, "wall_s": wall,
            "processes": world}


# ============================================================================ data
def batch_indices(step: int, micro: int, run: Run) -> list[int]:
    """The sample indices of (step, micro-batch) on this rank: a seeded permutation per epoch."""
    cfg, n = run.cfg, len(run.dataset)
    per_step = cfg.batch_size * cfg.grad_accum * run.world
    start = step * per_step + (micro * run.world + run.rank) * cfg.batch_size
    out = []
    for p in range(start, start + cfg.batch_size):
        epoch, i = divmod(p, n)
        perm = _epoch_perm(cfg.seed, epoch, n)
        out.append(int(perm[i]))
    return out


_PERMS: dict[tuple[int, int, int], np.ndarray] = {}


def _epoch_perm(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERMS:
        _PERMS.clear()
        _PERMS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMS[key]


class _StepBatches(torch.utils.data.Sampler):
    """The sample indices of every micro-batch of this rank from step `start` on, in training order."""

    def __init__(self, run: Run, start: int):
        self.run, self.start = run, start

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.run.cfg.steps):
            for micro in range(self.run.cfg.grad_accum):
                yield batch_indices(step, micro, self.run)


class _Indexed(torch.utils.data.Dataset):
    """The run's samples, each with its index (a batch's cached teacher rows are found by it)."""

    def __init__(self, dataset: VQADataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        return i, self.dataset[i]


def _collate_indexed(items: list[tuple[int, dict]], pad_id: int) -> dict[str, torch.Tensor | None]:
    batch = collate([x for _, x in items], pad_id)
    batch["index"] = torch.tensor([i for i, _ in items])  # (B,)
    return batch


def _micro_batches(run: Run) -> Iterator[dict]:
    """Collated micro-batches from run.step on; images are decoded in `num_workers` processes when asked."""
    return iter(torch.utils.data.DataLoader(
        _Indexed(run.dataset), batch_sampler=_StepBatches(run, run.step), num_workers=run.cfg.num_workers,
        collate_fn=functools.partial(_collate_indexed, pad_id=run.student.config.text.pad_token_id),
        pin_memory=run.device.type == "cuda"))


def cached_teacher_rows(run: Run, indices: list[int]) -> dict[str, torch.Tensor]:
    """The teacher cache's rows of the samples `indices`, as batch entries: cache_logprobs (M, k), cache_ids
    (M, k), and cache_counts (B,), each sample's row count."""
    rows = run.cache.rows([run.cache_keys[i] for i in indices])
    return {f"cache_{k}": v for k, v in rows.items()}


def _next_batch(run: Run) -> dict[str, torch.Tensor | None]:
    if run.batches is None:
        run.batches = _micro_batches(run)
    batch = next(run.batches)
    if run.cache is not None:  # looked up on the CPU before the step, copied with the batch
        batch.update(cached_teacher_rows(run, batch["index"].tolist()))
    return {k: (v.to(run.device) if v is not None else None) for k, v in batch.items()}


# ============================================================================ the step
@torch.no_grad()
def teacher_inputs(run: Run, batch: dict[str, torch.Tensor], s_out, need_attn: bool,
                   query_from: int = 0) -> DistillInputs | None:
    """The frozen teacher's side of the losses for `batch`: its logits, projector output and, when an
    alignment term is on, layer-0 attention. With a shared vision tower the student's CLIP features
    (`s_out.vision_features`) feed the teacher's projector: one CLIP forward for both.

    With a teacher cache the logits' part is the cache's top-k rows of the batch's samples (`_next_batch`
    put them in the batch), and the teacher — its prefix up to layer 0, when an alignment term is on —
    runs its projector, embeddings and layer 0's q·k map (`layer0_attention`) only: no later layer, no LM
    head, not the rest of layer 0. Its layer-0 attention holds the rows from `query_from` on."""
    teacher = run.teacher
    if teacher is None and run.cache is None:
        return None
    t_in = DistillInputs()
    if teacher is not None:
        with record_function("teacher_forward"):
            ids, mask, px = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
            if px is not None:
                t_in.image_features = (teacher.project(s_out.vision_features) if run.shared_vision
                                       else teacher.encode_images(px))  # (B_img, N, D_t)
            if run.cache is None:
                with (capture_layer0_attention(teacher.lm, query_from) if need_attn else contextlib.nullcontext()) as cap:
                    t_in.logits = teacher(ids, mask, image_features=t_in.image_features, compute_loss=False).logits
                t_in.attn_probs = cap.probs if need_attn else None
            elif need_attn:  # nothing reads the teacher's layer-0 output: only its q·k map is computed
                mm = teacher.build_inputs_embeds(ids, mask, None, t_in.image_features)
                t_in.attn_probs = layer0_attention(teacher.lm, mm.inputs_embeds, mm.attention_mask, query_from)
            t_in.attn_query_offset = query_from
    if run.cache is not None:
        _check_cached_rows(run, batch, s_out)
        t_in.topk_logprobs, t_in.topk_ids = batch["cache_logprobs"], batch["cache_ids"]
    return t_in


def _check_cached_rows(run: Run, batch: dict[str, torch.Tensor], s_out) -> None:
    """Each sample's cached rows are its KD positions in this run's token layout, one to one."""
    counts = kd_positions_mask(s_out.labels, s_out.attention_mask, run.loss_fn.config.kd_positions).sum(1)  # (B,)
    if torch.equal(counts, batch["cache_counts"]):
        return
    j = int((counts != batch["cache_counts"]).nonzero()[0, 0])
    raise CacheError(f"teacher cache {run.cfg.teacher_cache}: training sample {int(batch['index'][j])} has "
                     f"{int(batch['cache_counts'][j])} cached KD positions, this run's token layout gives it "
                     f"{int(counts[j])}: the cache was made for another layout")


def micro_step(run: Run, batch: dict[str, torch.Tensor], scale: float) -> dict[str, float]:
    """Forward of the student (and teacher), the loss terms, and backward of total × `scale` (gradients
    accumulate). Returns the unscaled loss terms."""
    student, cfg = run.student, run.loss_fn.config
    need_attn = run.teacher is not None and (cfg.att_weight > 0 or cfg.v_weight > 0)
    # The paper's terms read only the rows of text after the image: the captures skip the rows before it
    # (the system prompt's and the 144 vision tokens'). The release variant reads every row.
    query_from = (first_text_after_image(batch["input_ids"], student.config.num_image_tokens)
                  if cfg.variant == "paper" else 0)
    amp = torch.autocast(run.device.type, dtype=run.autocast_dtype) if run.autocast_dtype else contextlib.nullcontext()
    with contextlib.ExitStack() as stack:
        # layer-0 capture stays open through backward: gradient checkpointing recomputes layer 0 there
        s_cap = stack.enter_context(capture_layer0_attention(student.lm, query_from)) if need_attn and cfg.att_weight > 0 else None
        with amp:
            # every student call goes through its root forward (FSDP unshards there)
            with record_function("student_forward"):
                s_out = student(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                                labels=batch["labels"], compute_loss=False)
            t_in = teacher_inputs(run, batch, s_out, need_attn, query_from)
            s_in = DistillInputs(s_out.logits, s_out.labels, s_out.attention_mask, s_out.image_mask,
                                 s_out.image_features, s_cap.probs if s_cap else None, query_from)
            with record_function("losses"):
                terms = run.loss_fn(s_in, t_in)
        with record_function("backward"):
            (terms["total"] * scale).backward()
    return {k: float(v.detach()) for k, v in terms.items()}


def train_step(run: Run) -> dict[str, float]:
    """One optimizer step (grad_accum micro-batches); returns the averaged loss terms, lr, grad norm."""
    cfg = run.cfg
    run.student.train()
    run.optimizer.zero_grad(set_to_none=True)
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    for micro in range(cfg.grad_accum):
        terms = micro_step(run, _next_batch(run), 1.0 / cfg.grad_accum)
        for k in LOSS_TERMS:
            sums[k] += terms[k] / cfg.grad_accum
    if run.world > 1:  # report the global mean: every rank's gradient already is (FSDP averages)
        t = torch.tensor([sums[k] for k in LOSS_TERMS], dtype=torch.float64, device=run.device)
        dist.all_reduce(t)
        sums = dict(zip(LOSS_TERMS, (t / run.world).tolist()))
    bad = [k for k in LOSS_TERMS if not math.isfinite(sums[k])]
    if bad:
        ckpt = latest_checkpoint(run.out)
        kept = f"The last good checkpoint, {ckpt}, is kept" if ckpt else "No checkpoint had been written yet"
        raise TrainingDiverged(f"step {run.step + 1}: loss term(s) {', '.join(bad)} became NaN/inf; stopped. {kept}")
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    return {"step": run.step, **sums, "grad_norm": gnorm, "lr": lr}


# ============================================================================ checkpoints
def _ckpt_root(run: Run) -> Path:
    return run.out / "train" / "checkpoints"


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optim_state(run: Run) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model = nn.ModuleList([run.student, run.loss_fn])
    return get_optimizer_state_dict(model, run.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _gather(run: Run) -> dict[str, dict]:
    """Full (unsharded, CPU) states of the student, the adapters and the optimizer. Collective under FSDP:
    every rank calls it, before rank 0 writes anything (so a failed write cannot leave a rank waiting)."""
    return {"student": _full_state(run.student), "adapters": _full_state(run.loss_fn), "optim": _optim_state(run)}


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_extra": [random.getstate()[0], random.getstate()[2]],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((s["python_extra"][0], tuple(s["python"]), s["python_extra"][1]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def _bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _adapter_bytes(state: dict[str, torch.Tensor]) -> bytes | None:
    if not state:
        return None
    from safetensors.torch import save as st_save

    return st_save({k: v.contiguous() for k, v in state.items()})


def save_checkpoint(run: Run, states: dict[str, dict] | None = None) -> Path | None:
    """`train/checkpoints/step-NNNNNN/`: the student (mtgv) + adapters + optimizer/scheduler/RNG state + the
    run's config. Staged in a temp folder and renamed: a kill or a full disk mid-write leaves the previous
    checkpoints as they were; only then are those past `keep_last` removed. `states`: from `_gather`."""
    states = states or _gather(run)
    if not run.is_main:
        return None
    extra = {"trainer_state.pt": _bytes({"step": run.step, "world": run.world, "optimizer": states["optim"],
                                         "scheduler": run.scheduler.state_dict(), "rng": _rng_state()}),
             "train_config.yaml": dump_config(with_absolute_paths(run.cfg)).encode()}
    ad = _adapter_bytes(states["adapters"])
    if ad:
        extra["adapters.safetensors"] = ad
    root = _ckpt_root(run)
    path = save_model(run.student, root / f"step-{run.step:06d}", tokenizer=run.tokenizer,
                      extra_files=extra, state=states["student"])
    for old in checkpoints(run.out)[:-run.cfg.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def checkpoints(out: Path) -> list[Path]:
    """The step checkpoints in a run's output_dir, oldest first."""
    root = out / "train" / "checkpoints"
    return sorted(p for p in root.glob("step-*") if re.fullmatch(r"step-\d{6}", p.name)) if root.is_dir() else []


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = checkpoints(out)
    return ckpts[-1] if ckpts else None


def _last_checkpoint_note(run: Run) -> str:
    ckpt = latest_checkpoint(run.out)
    if ckpt is None:
        return "no checkpoint was written before (save_every=N keeps one every N steps)"
    return f"the last complete checkpoint is {ckpt}: free space and rerun the same command to resume from it"


def _remove_stale_temps(run: Run) -> None:
    """Temp files and folders that a killed writer left in this run's folders (step checkpoints,
    metrics, the final model), gigabytes each at real shapes."""
    remove_stale_temps(run.out.parent, run.out.name)
    for folder in (run.out, run.out / "train", _ckpt_root(run)):
        remove_stale_temps(folder)  # only our writers write into these


def _log(run: Run, msg: str) -> None:
    if run.is_main:
        print(msg, file=sys.stderr, flush=True)


def checkpoint_differences(cfg: TrainConfig, world: int = 1, also: tuple[str, ...] = ()) -> list[str]:
    """How the newest checkpoint in cfg.output_dir differs from a run of `cfg` on `world` processes, in the
    settings that change what a run computes (`run_settings`, plus `also`; the number of processes); []
    when there is no checkpoint or it is this run's."""
    ckpt = latest_checkpoint(Path(cfg.output_dir))
    if ckpt is None:
        return []
    try:
        recorded = yaml.safe_load((ckpt / "train_config.yaml").read_text(encoding="utf-8"))
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state is one clear error
        raise CheckpointError(f"cannot resume from {ckpt}: {type(e).__name__} ({str(e).splitlines()[0]})") from None
    diffs = run_differences(recorded if isinstance(recorded, dict) else {}, cfg, also)
    if state.get("world", world) != world:
        diffs.append(f"processes: {state['world']} → {world} (the global batch)")
    return diffs


def _resume_point(cfg: TrainConfig, world: int) -> Path | None:
    """The newest checkpoint in output_dir when resume is on; one of another run is refused, naming what differs."""
    ckpt = latest_checkpoint(Path(cfg.output_dir))
    if ckpt is None or not cfg.resume:
        return None
    diffs = checkpoint_differences(cfg, world)
    if diffs:
        raise ConfigError(f"{cfg.output_dir} holds checkpoints of another run ({ckpt.name}), with other settings: "
                          f"{'; '.join(diffs)}. Use another output_dir, or resume=false to start fresh "
                          "(deletes those checkpoints)")
    return ckpt


def _load_checkpoint(run: Run, ckpt: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    set_model_state_dict(run.student, read_mtgv_state_dict(ckpt, run.student), options=opts)
    if (ckpt / "adapters.safetensors").is_file():
        set_model_state_dict(run.loss_fn, load_file(str(ckpt / "adapters.safetensors")), options=opts)
    set_optimizer_state_dict(nn.ModuleList([run.student, run.loss_fn]), run.optimizer, state["optimizer"], options=opts)
    run.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    run.step = int(state["step"])
    _log(run, f"resuming from {ckpt} (step {run.step} of {run.cfg.steps})")


# ============================================================================ the loop
def _metrics_path(run: Run) -> Path:
    return run.out / "train" / "metrics.jsonl"


def _truncate_metrics(run: Run) -> None:
    """After a resume, drop the lines logged past the checkpoint so the log reads as one clean run."""
    path = _metrics_path(run)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= run.step:
            keep.append(line)
    atomic_write(path, ("\n".join(keep) + "\n") if keep else "")
    run.history = [json.loads(x) for x in keep]


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """Run the recipe; returns a summary (final losses, steps, wall time, output paths).

    stop_after: stop (as if killed) after this many steps of this invocation — for tests and drills.
    The summary's wall_s is this invocation's, setup included. output_dir is locked while the run writes it
    (rank 0): another run into it, started together or resuming beside this one, is refused.
    """
    lock = FolderLock(cfg.output_dir, "output_dir", "another training run")
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        if main:
            lock.take()  # before setup reads its checkpoints (when it exists)
        return _train(cfg, stop_after, lock if main else None)
    finally:
        lock.release()


def _train(cfg: TrainConfig, stop_after: int | None, lock: FolderLock | None) -> dict:
    t0 = time.perf_counter()
    run = setup(cfg)
    if run.is_main:
        (run.out / "train").mkdir(parents=True, exist_ok=True)
        if lock is not None:
            lock.take()  # a new folder: taken now, before anything is written into it
        (run.out / "train" / "summary.json").unlink(missing_ok=True)  # present only once this run is done
        atomic_write(run.out / "train" / "config.yaml", dump_config(with_absolute_paths(cfg)))
        _truncate_metrics(run)
    # on a terminal the bar redraws freely; in a log file (CI, nohup) it writes a line every 30 s
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"{run.out.name} [{cfg.method}]",
               disable=not (cfg.progress and run.is_main), dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    sink = open(_metrics_path(run), "a") if run.is_main else None
    done_here = 0
    try:
        while run.step < cfg.steps:
            row = train_step(run)
            done_here += 1
            if run.is_main and (run.step % cfg.log_every == 0 or run.step == cfg.steps):
                with writing(_metrics_path(run)):
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                run.history.append(row)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in LOSS_TERMS if row[k] or k in ("ce", "total")}, refresh=False)
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < cfg.steps:
                save_checkpoint(run)
            if stop_after is not None and done_here >= stop_after:
                return {"stopped_at": run.step}
    except DiskFull as e:
        raise DiskFull(f"{e}; stopped at step {run.step}: {_last_checkpoint_note(run)}") from None
    finally:
        bar.close()
        run.batches = None  # the data loader's workers end here
        if sink:
            with contextlib.suppress(OSError):  # a full disk already raised above
                sink.close()
    return save_final(run, time.perf_counter() - t0)


def save_final(run: Run, wall_s: float) -> dict:
    """The final student as an mtgv directory at output_dir first (the one output a full disk must not
    take), then adapters and summary under train/, the final step's checkpoint, and the loss plot."""
    states = _gather(run)
    summary = {"method": run.cfg.method, "steps": run.step, "wall_s": round(wall_s, 2),
               "final": run.history[-1] if run.history else {}, "output_dir": str(run.out),
               "dropped_too_long": run.dataset.stats.n_too_long, "skipped_malformed": run.dataset.stats.n_malformed,
               "skipped_not_in_cache": run.cache_skipped, "vision_feature_memo": _memo_stats(run),
               "config": run.cfg.to_dict()}
    if run.is_main:
        try:
            card = model_card(summary, run.cache.spec.k if run.cache is not None else None)
            save_model(run.student, run.out, tokenizer=run.tokenizer, state=states["student"], merge=True,
                       extra_files={"README.md": card.encode()})
        except DiskFull as e:
            raise DiskFull(f"{e}; the trained student (step {run.step}) is not saved: {_last_checkpoint_note(run)}") from None
        try:
            ad = _adapter_bytes(states["adapters"])
            if ad:  # beside the student, not inside it: the adapters belong to the loss
                atomic_write(run.out / "train" / "adapters.safetensors", ad)
            atomic_write(run.out / "train" / "summary.json", json.dumps(summary, indent=2))
            save_checkpoint(run, states)
            plot_losses(run.history, run.out / "train" / "loss_curve.png", title=f"{run.cfg.method}")
        except DiskFull as e:
            raise DiskFull(f"{e}; the trained student (step {run.step}) is saved in {run.out}") from None
    if run.world > 1:
        dist.barrier()
    return summary


def _memo_stats(run: Run) -> dict | None:
    """The vision feature memo's totals (of this process, across the runs that share it)."""
    memo = run.student.vision_tower.memo
    return None if memo is None else {"hits": memo.hits, "misses": memo.misses, "images_kept": len(memo.store),
                                      "mib": round(memo.bytes / 2**20, 1)}


def plot_losses(history: list[dict], path: Path, title: str = "") -> None:
    """Each non-zero loss term against the step, one PNG."""
    if not history or not can_draw(path):
        return
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    steps = [r["step"] for r in history]
    for k in LOSS_TERMS:
        ys = [r[k] for r in history]
        if any(ys):
            ax.plot(steps, ys, label=k, linewidth=1.8 if k == "total" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())
