"""One training step at real shapes, three ways, measured in one run:

  plain      the student alone (CE), as the baseline trains
  logit-kd   plain + the frozen teacher's forward + KD (the cost of the teacher alone)
  alignkd    our Align-KD step: one shared CLIP forward, SDPA everywhere, layer-0 capture by hooks,
             KD on answer positions, teacher frozen in bf16
  cached     Align-KD with logit KD from an offline teacher cache (top --cache-k log-probs per KD position,
             looked up per step as `train` does): the teacher runs its projector, embeddings and layer 0's
             attention map only (the student's CLIP serves it), and only the tensors those read exist
  logit-kd-cached   plain + KD from the cache: no teacher at all
  cache-build  not a training step: the `teacher-cache` command's work per batch (the whole teacher, its own CLIP
             included, in inference mode, and the top --cache-k at the answer positions copied to the host), to
             size a cache build: samples/s = batch / seconds
  +compile   the same step with compile=true (each transformer block but LM layer 0 torch.compiled)
  +memo      the same step with vision_feature_memo_gb: the batch repeats, so after the warm-up step every
             image's CLIP features come from the memo (the step of images seen before: later epochs)
  release    the public release's computation: eager attention with attentions on every layer in both
             models, CLIP run twice, KD on every position

    python benchmarks/train_step.py                  # GPU: 1.7B student + 7B teacher, random weights, bf16
    python benchmarks/train_step.py --tiny           # CPU: tiny presets (what this machine can run)
    python benchmarks/train_step.py --layers 1 --batch 1 --text 32   # real widths, one layer: a smoke run
    python benchmarks/train_step.py --kinds plain,alignkd,cached --rounds 5   # interleaved rounds, one process
    python benchmarks/train_step.py --kinds plain+compile,alignkd+compile,cached+compile   # the GPU cache row
    python benchmarks/train_step.py --flops --layers 1 --batch 1 --kinds plain,cached   # work counted, not timed

Batch 8 × (144 image + 512 text) positions by default. Student: fp32 master weights + bf16 autocast +
AdamW (as users train). Prints a table (time, tokens/s, MFU, peak memory) with ratios to the first kind,
and writes JSON. --rounds R > 1 builds every kind first and then times them in R interleaved rounds (all
models in memory at once: tiny presets, or a GPU that holds them), ratios the median of the per-round
ratios; the default times one kind after the other, freeing each before the next. The measured numbers
are in the README (Results).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from alignkd.distill import DistillInputs, teacher_topk
from alignkd.distill.attention import capture_layer0_attention
from alignkd.fileio import atomic_write
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from alignkd.model import IMAGE_TOKEN_INDEX, MobileVLM, get_preset
from alignkd.model.checkpoint import keep_attention_map_inputs, keep_layers
from alignkd.model.vision import attach_feature_memo
from alignkd.train.config import load_config
from alignkd.train.recipe import Run, cached_teacher_rows, compile_blocks, make_loss, make_optimizer, micro_step
from alignkd.train.teacher_cache import CacheSpec, CacheWriter, TeacherCache, finalize, teacher_rows

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _config(name: str, layers: int | None):
    cfg = get_preset(name)
    if layers:  # keep every width, cut the depth: the real-shape code path on a small machine
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=layers))
    return cfg


def _models(tiny: bool, device: torch.device, attn: str, with_teacher: bool, layers: int | None,
            teacher_prefix: bool = False):
    """Student and teacher with random weights; teacher_prefix: only what the teacher's layer-0 attention map
    reads is kept (`keep_layers`, `keep_attention_map_inputs`), as a cached run loads it."""
    s_name, t_name = ("tiny-student", "tiny-teacher") if tiny else ("mobilevlm-v2-1.7b", "mobilevlm-v2-7b")
    torch.manual_seed(0)
    with device:
        student = MobileVLM(_config(s_name, layers), attn_implementation=attn)
        if not with_teacher:
            return student, None
        teacher = MobileVLM(_config(t_name, 1 if teacher_prefix else layers), attn_implementation=attn)
    if teacher_prefix:
        keep_attention_map_inputs(keep_layers(teacher, 1))
    teacher.vision_tower.load_state_dict(student.vision_tower.state_dict())  # one shared frozen CLIP
    teacher.to(torch.bfloat16 if device.type == "cuda" else torch.float32).requires_grad_(False).eval()
    return student, teacher


def _batch(model: MobileVLM, b: int, text: int, device: torch.device) -> dict:
    cfg = model.config
    ids = torch.randint(3, cfg.text.vocab_size, (b, text + 1), device=device)
    ids[:, 0], ids[:, 1] = cfg.text.bos_token_id, IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, : text // 2] = -100  # the second half of the text is the "answer"
    s = cfg.vision.image_size
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(b, 3, s, s, device=device)}


def _synthetic_cache(root: str, batch: dict, k: int, vocab: int, temperature: float = 1.0) -> tuple[TeacherCache, list]:
    """A teacher cache of the batch's samples (top-k of random teacher logits at their answer positions),
    written and read back through the cache format, with one key per sample."""
    spec = CacheSpec(teacher={"preset": "bench"}, k=k, temperature=temperature, kd_positions="text", template="v1",
                     vocab_size=vocab)
    writer = CacheWriter(root, spec)
    keys = [hashlib.sha256(str(i).encode()).digest() for i in range(batch["labels"].shape[0])]
    counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()  # answer positions (the image's labels are -100)
    g = torch.Generator().manual_seed(0)
    for key, n in zip(keys, counts):
        writer.add(key, *teacher_topk(torch.randn(n, vocab, generator=g) * 3, k, temperature))
    writer.flush()
    finalize(root, spec)
    return TeacherCache(root, spec), keys


def _release_micro_step(student, teacher, loss_fn, batch, amp):
    """The release's way: eager attention + attentions of every layer, CLIP per model, KD on all positions."""
    with amp:
        s_img = student.encode_images(batch["pixel_values"])
        mm = student.build_inputs_embeds(batch["input_ids"], batch["attention_mask"], batch["labels"], s_img)
        s_out = student.lm(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, output_attentions=True)
        with torch.no_grad():
            t_img = teacher.encode_images(batch["pixel_values"])  # CLIP again
            tm = teacher.build_inputs_embeds(batch["input_ids"], batch["attention_mask"], None, t_img)
            t_out = teacher.lm(inputs_embeds=tm.inputs_embeds, attention_mask=tm.attention_mask, output_attentions=True)
        terms = loss_fn(DistillInputs(s_out.logits, mm.labels, mm.attention_mask, mm.image_mask, s_img, s_out.attentions[0]),
                        DistillInputs(t_out.logits, image_features=t_img, attn_probs=t_out.attentions[0]))
    terms["total"].backward()


def _profile(kind: str, one_step, device: torch.device, rows: int = 18) -> None:
    """One step under torch.profiler: device time per phase (the recipe's record_function ranges) and the
    top kernels, so a slow step says where its time goes."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    cuda = device.type == "cuda"
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        one_step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ev = prof.key_averages()
    phases = ("cache_lookup", "student_forward", "teacher_forward", "losses", "backward", "clip_and_optimizer")
    # host ms / device ms per phase: a phase whose host time exceeds its device time keeps the GPU waiting
    got: dict[str, tuple[float, float]] = {}  # a range is two events on a GPU: the host's and the device's
    for e in ev:
        if e.key in phases:
            h, d = got.get(e.key, (0.0, 0.0))
            got[e.key] = (max(h, e.cpu_time_total / 1e3), max(d, e.device_time_total / 1e3))
    busy = sum(e.self_device_time_total for e in ev if e.device_type == DeviceType.CUDA
               and not e.is_user_annotation) / 1e3  # kernel time, as the table's "Self CUDA time total"
    print(f"[{kind}] step {wall * 1e3:.1f} ms (profiled)" + (f", kernels {busy:.1f} ms" if cuda else "")
          + "; phase host/device ms: " + ", ".join(f"{k} {h:.1f}/{d:.1f}" for k, (h, d) in got.items()), flush=True)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(ev.table(sort_by=sort, row_limit=rows, max_name_column_width=60), flush=True)


@dataclasses.dataclass
class Prepared:
    """One kind, built and ready: `one_step()` runs a full optimizer step."""

    kind: str
    one_step: Callable[[], None]
    warmup: int
    n_tok: int
    flops: float
    teacher_gb: float  # bytes of the teacher's tensors that exist (on the device): 0 without a teacher
    keep: tuple  # the models etc. (freed with this object)


def prepare(kind: str, tiny: bool, device: torch.device, b: int, text: int, steps: int, layers: int | None,
            cache_k: int, workdir: str) -> Prepared:
    base_kind, *mods = kind.split("+")
    if base_kind == "cache-build":
        return _prepare_cache_build(tiny, device, b, text, layers, cache_k)
    compiled, memo = "compile" in mods, "memo" in mods
    attn = "eager" if base_kind == "release" else "sdpa"
    cached = base_kind in ("cached", "logit-kd-cached")
    student, teacher = _models(tiny, device, attn, with_teacher=base_kind not in ("plain", "logit-kd-cached"),
                               layers=layers, teacher_prefix=cached)
    if teacher is not None and base_kind != "release":  # as `train` does: the student's CLIP serves both
        teacher.vision_tower = None
    if compiled:  # as the recipe does with compile=true
        compile_blocks(student, teacher)
    if memo:  # as the recipe does with vision_feature_memo_gb
        attach_feature_memo(student.vision_tower, 1 << 40)
    ref = teacher or student
    method = {"plain": "baseline", "logit-kd": "logit-kd", "logit-kd-cached": "logit-kd"}.get(base_kind, "alignkd")
    flags = {"method": method, "teacher": "bench" if method != "baseline" else None, "steps": steps,
             "loss.variant": "release" if base_kind == "release" else "paper", "progress": False}
    if cached:
        flags.update({"teacher_cache": workdir, "loss.kd_topk": cache_k})
    cfg = load_config(flags=flags)
    loss_fn = make_loss(cfg, student, teacher).to(device)
    opt = make_optimizer(student, loss_fn, cfg, device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    batch = _batch(student, b, text, device)
    cache, keys = _synthetic_cache(f"{workdir}/{kind}", batch, cache_k, ref.config.text.vocab_size) if cached else (None, None)
    run = Run(cfg, None, device, 0, 1, None, student, teacher, loss_fn, None, opt, None, True, amp_dtype,
              cache=cache, cache_keys=keys)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)
    index = list(range(b))

    def one_step():
        opt.zero_grad(set_to_none=True)
        if base_kind == "release":
            _release_micro_step(student, teacher, loss_fn, batch, amp)
        elif cached:  # the lookup and the copy to the device, as `train` does per micro-batch
            with record_function("cache_lookup"):
                rows = {k: v.to(device) for k, v in cached_teacher_rows(run, index).items()}
            micro_step(run, {**batch, "index": torch.tensor(index, device=device), **rows}, 1.0)
        else:
            micro_step(run, batch, 1.0)
        with record_function("clip_and_optimizer"):
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()

    n_tok = b * (text + student.config.num_image_tokens)
    s_params = sum(p.numel() for p in student.lm.parameters()) + sum(p.numel() for p in student.mm_projector.parameters())
    v_params = sum(p.numel() for p in student.vision_tower.parameters())
    t_params = sum(p.numel() for p in ref.lm.parameters()) + sum(p.numel() for p in ref.mm_projector.parameters())
    patches = b * (student.config.vision.num_patches + 1)
    flops = 6 * s_params * n_tok + 2 * v_params * patches * {"release": 2}.get(base_kind, 0 if memo else 1)
    if base_kind not in ("plain", "logit-kd-cached"):
        flops += 2 * t_params * n_tok
    t_bytes = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()]) if teacher else 0
    return Prepared(kind, one_step, 3 if compiled else 1, n_tok, flops, round(t_bytes / 1e9, 2),
                    (student, teacher, opt, run, loss_fn, batch))


def _prepare_cache_build(tiny: bool, device: torch.device, b: int, text: int, layers: int | None,
                         cache_k: int) -> Prepared:
    """The teacher as `teacher-cache` loads it (whole, bf16 on a GPU) and one batch of its work: `teacher_rows`
    under autocast, as `build` calls it, and the rows' copy to the host (not the shard's write: a disk's speed)."""
    torch.manual_seed(0)
    with device:
        teacher = MobileVLM(_config("tiny-teacher" if tiny else "mobilevlm-v2-7b", layers), attn_implementation="sdpa")
    cuda = device.type == "cuda"
    teacher.to(torch.bfloat16 if cuda else torch.float32).requires_grad_(False).eval()
    if cuda:  # the fp32 weights of the build above are gone: the peak is the cache build's, not the init's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    spec = CacheSpec(teacher={"preset": "bench"}, k=cache_k, temperature=1.0, kd_positions="text", template="v1",
                     vocab_size=teacher.config.text.vocab_size)
    batch = _batch(teacher, b, text, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def one_step():
        with torch.inference_mode():
            logp, ids, _ = teacher_rows(teacher, batch, spec, amp)
            logp.cpu(), ids.cpu()

    n_tok = b * (text + teacher.config.num_image_tokens)
    params = sum(p.numel() for p in teacher.lm.parameters()) + sum(p.numel() for p in teacher.mm_projector.parameters())
    v_params = sum(p.numel() for p in teacher.vision_tower.parameters())
    flops = 2 * params * n_tok + 2 * v_params * b * (teacher.config.vision.num_patches + 1)
    t_bytes = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
    return Prepared("cache-build", one_step, 1, n_tok, flops, round(t_bytes / 1e9, 2), (teacher, batch))


def timed(p: Prepared, n: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        p.one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def summarize(p: Prepared, times: list[float], warm_times: list[float], device: torch.device) -> dict:
    t = statistics.median(times)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {"step": p.kind, "seconds": round(t, 4), "tokens_per_s": round(p.n_tok / t, 1),
            "tflops": round(p.flops / t / 1e12, 2), "mfu": round(p.flops / t / peak, 3) if peak else None,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if device.type == "cuda" else None,
            "teacher_gb": p.teacher_gb, "warmup_s": round(sum(warm_times), 1), "steps_timed": len(times)}


def _free(device: torch.device) -> None:
    gc.collect()  # module graphs hold cycles: free them before the next kind builds its models
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(kind: str, tiny: bool, device: torch.device, b: int, text: int, steps: int, layers: int | None,
            profile: bool = False, cache_k: int = 32, workdir: str = "") -> dict:
    """One kind alone: build, warm up, time `steps` steps, free (peak memory is this kind's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    p = prepare(kind, tiny, device, b, text, steps, layers, cache_k, workdir)
    warm = timed(p, p.warmup, device)  # compiling takes the first steps (grad-mode and shape guards settle)
    row = summarize(p, timed(p, steps, device), warm, device)
    if profile:
        _profile(kind, p.one_step, device)
    del p
    _free(device)
    return row


def measure_interleaved(kinds: list[str], rounds: int, tiny: bool, device: torch.device, b: int, text: int,
                        steps: int, layers: int | None, cache_k: int, workdir: str) -> list[dict]:
    """Every kind built and warmed up first, then `rounds` rounds of `steps` steps of each kind in turn, so
    that a slow phase of the machine falls on every kind alike. A row's ratio_median is the median over
    rounds of its round's median step time over the first kind's."""
    prepared = [prepare(k, tiny, device, b, text, steps, layers, cache_k, workdir) for k in kinds]
    warm = [timed(p, p.warmup, device) for p in prepared]
    per_round: list[list[list[float]]] = [[] for _ in prepared]
    for _ in range(rounds):
        for i, p in enumerate(prepared):
            per_round[i].append(timed(p, steps, device))
    rows = []
    for i, p in enumerate(prepared):
        row = summarize(p, [t for r in per_round[i] for t in r], warm[i], device)
        ratios = [statistics.median(a) / statistics.median(ref) for a, ref in zip(per_round[i], per_round[0])]
        row.update(ratio_median=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
                   ratio_max=round(max(ratios), 3), round_medians=[round(statistics.median(r), 4) for r in per_round[i]],
                   peak_mem_gb=None)  # every kind was in memory at once: no peak of its own
        rows.append(row)
    del prepared
    _free(device)
    return rows


def check_capture(tiny: bool, device: torch.device, b: int, text: int, layers: int | None) -> dict:
    """GPU correctness at the benchmark's shapes: the hook's layer-0 probabilities (SDPA/flash model,
    bf16 autocast) against eager `output_attentions` of the same weights, and a gradient into q_proj."""
    name = "tiny-student" if tiny else "mobilevlm-v2-1.7b"
    torch.manual_seed(0)
    with device:
        sdpa = MobileVLM(_config(name, layers or 2), attn_implementation="sdpa")
        eager = MobileVLM(_config(name, layers or 2), attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    batch = _batch(sdpa, b, text, device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    amp = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    with capture_layer0_attention(sdpa.lm) as cap, amp:
        out = sdpa(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], compute_loss=False)
        cap.probs.float().pow(2).sum().backward()  # (a plain sum is 1 per row: no gradient)
    with torch.no_grad(), amp:
        img = eager.encode_images(batch["pixel_values"])
        mm = eager.build_inputs_embeds(batch["input_ids"], batch["attention_mask"], None, img)
        want = eager.lm(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask,
                        output_attentions=True).attentions[0].float()  # (B, H, T, T)
    got = cap.probs.detach().float()
    q_grad = sdpa.lm.model.layers[0].self_attn.q_proj.weight.grad
    row = {"max_abs": float((got - want).abs().max()), "mean_abs": float((got - want).abs().mean()),
           "row_sum_err": float((got.sum(-1) - 1).abs().max()), "logits_finite": bool(out.logits.isfinite().all()),
           "q_proj_grad_norm": float(q_grad.norm()) if q_grad is not None else 0.0}
    del sdpa, eager, out, cap
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


class _OpCount(TorchDispatchMode):
    """Counts the aten operators a step dispatches: in eager mode each is a kernel launch the host pays for."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def count_flops(kinds: list[str], tiny: bool, device: torch.device, b: int, text: int, layers: int | None,
                cache_k: int, workdir: str) -> list[dict]:
    """Matmul / attention FLOPs (torch.utils.flop_counter) and aten operators of one optimizer step of each
    kind, counted, not timed. With `layers` L also at L + 1: the difference is one student layer's work, which
    puts the kinds without per-layer teacher work (plain, the cached ones) at the student's full depth."""
    rows = []
    for kind in kinds:
        counts, ops = [], []
        for depth in ([layers, layers + 1] if layers else [None]):
            p = prepare(kind, tiny, device, b, text, 1, depth, cache_k, workdir)
            p.one_step()  # the optimizer's state is made on the first step
            counter, op_count = FlopCounterMode(display=False), _OpCount()
            with counter, op_count:
                p.one_step()
            counts.append(counter.get_total_flops())
            ops.append(op_count.n)
            del p
            _free(device)
        row = {"step": kind, "flops": counts[0], "flops_full_depth": None, "aten_ops": ops[0], "aten_ops_full_depth": None}
        if layers and kind.split("+")[0] in ("plain", "cached", "logit-kd-cached"):
            extra = get_preset("tiny-student" if tiny else "mobilevlm-v2-1.7b").text.num_layers - layers
            row["flops_full_depth"] = counts[0] + extra * (counts[1] - counts[0])
            row["aten_ops_full_depth"] = ops[0] + extra * (ops[1] - ops[0])
        rows.append(row)
        print(f"  {kind}: {row['flops'] / 1e12:.4g} TFLOP" + (f", {row['flops_full_depth'] / 1e12:.4g} at full depth"
                                                             if row["flops_full_depth"] else ""), flush=True)
    return rows


def _shape(tiny: bool, layers: int | None) -> str:
    return "tiny presets" if tiny else "1.7B student + 7B teacher" + (f" cut to {layers} layers" if layers else "")


def goal_lines(rows: list[dict]) -> list[str]:
    """Issue 15's goals, read off the rows: each cached Align-KD kind against the plain kind with the same
    modifiers (cached+compile against plain+compile): ≤ 1.15× its step time, peak memory ≤ its + 3 GB."""
    by = {r["step"]: r for r in rows}
    out = []
    for r in rows:
        base, *mods = r["step"].split("+")
        plain = by.get("+".join(["plain", *mods]))
        if base != "cached" or plain is None:
            continue
        x = r["ratio_median"] if plain is rows[0] else r["seconds"] / plain["seconds"]  # interleaved: per round
        line = f"goal: {r['step']} / {plain['step']} = {x:.3f} (≤ 1.15: {'met' if x <= 1.15 else 'not met'})"
        if r["peak_mem_gb"] is not None and plain["peak_mem_gb"] is not None:
            d = r["peak_mem_gb"] - plain["peak_mem_gb"]
            line += f"; peak memory {d:+.1f} GB (≤ +3: {'met' if d <= 3 else 'not met'})"
        out.append(line)
    return out


KINDS = ("plain", "logit-kd", "alignkd", "cached", "logit-kd-cached", "release", "cache-build")
MODIFIERS = ("compile", "memo")


def check_args(ap: argparse.ArgumentParser, a: argparse.Namespace, tiny: bool) -> None:
    """Every bad argument refused before any model is built (argparse's error: exit status 2)."""
    for name in ("batch", "text", "steps", "rounds", "cache_k", "layers"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    vocab = get_preset("tiny-teacher" if tiny else "mobilevlm-v2-7b").text.vocab_size
    if a.cache_k > vocab:
        ap.error(f"--cache-k {a.cache_k} is more than the teacher's {vocab}-token vocabulary")
    for kind in a.kinds.split(","):
        base, *mods = kind.split("+")
        if base not in KINDS or not set(mods) <= set(MODIFIERS):
            ap.error(f"--kinds: unknown step {kind!r} (steps: {', '.join(KINDS)}; modifiers: "
                     + ", ".join(f"+{m}" for m in MODIFIERS) + ")")
        if base == "cache-build" and mods:
            ap.error(f"--kinds: {kind!r}: cache-build takes no modifier (the command runs the teacher eagerly)")
    parent = os.path.dirname(os.path.abspath(a.json))
    if not os.path.isdir(parent):
        ap.error(f"--json {a.json}: {parent} is not a folder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny presets (default on a machine without CUDA)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None, help="cut both LMs to this many layers (smoke runs)")
    ap.add_argument("--profile", action="store_true", help="after timing, profile one step of each kind")
    ap.add_argument("--kinds", default="plain,logit-kd,alignkd,release,plain+compile,alignkd+compile",
                    help="which steps, comma-separated (+compile: with compile=true; +memo: CLIP features from the memo); ratios are to the first")
    ap.add_argument("--cache-k", type=int, default=32, help="top-k log-probs per KD position of the cached kind")
    ap.add_argument("--rounds", type=int, default=1, help="> 1: every kind built first, then timed in interleaved "
                    "rounds of --steps steps")
    ap.add_argument("--flops", action="store_true", help="count the FLOPs of one step of each kind instead of "
                    "timing (eager kinds); with --layers L also at L + 1, extrapolated to the student's full depth")
    ap.add_argument("--json", default="benchmarks/train_step.json")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = a.tiny or (device.type != "cuda" and not a.layers)  # --layers asks for real widths anywhere
    text = a.text if not tiny else min(a.text, 128)
    check_args(ap, a, tiny)
    if a.flops:
        if "compile" in a.kinds:
            ap.error("--flops counts eager kinds: compiling changes no FLOP (drop +compile)")
        flops_main(a, tiny, device, text)
        return
    check = check_capture(tiny, device, a.batch, text, a.layers)
    print(f"layer-0 capture vs eager output_attentions ({'bf16 autocast' if device.type == 'cuda' else 'fp32'}): "
          f"max |diff| {check['max_abs']:.2e}, mean {check['mean_abs']:.2e}, row-sum error {check['row_sum_err']:.2e}, "
          f"q_proj grad norm {check['q_proj_grad_norm']:.3e}", flush=True)
    kinds = a.kinds.split(",")
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    record = {"device": dev, "tiny": tiny, "layers": a.layers, "batch": a.batch, "text": text, "rounds": a.rounds,
              "steps": a.steps, "cache_k": a.cache_k, "torch": torch.__version__, "capture_check": check}
    with tempfile.TemporaryDirectory(prefix="train-step-cache-") as workdir:  # the cached kind's cache
        if a.rounds > 1:
            rows = measure_interleaved(kinds, a.rounds, tiny, device, a.batch, text, a.steps, a.layers, a.cache_k,
                                       workdir)
        else:
            rows = []
            for k in kinds:
                rows.append(measure(k, tiny, device, a.batch, text, a.steps, a.layers, a.profile, a.cache_k, workdir))
                r = rows[-1]
                print(f"  {k}: {r['seconds']:.4f} s/step, peak {r['peak_mem_gb']} GB, warm-up {r['warmup_s']} s",
                      flush=True)
                # each row kept as soon as it is measured: a run stopped by a time limit keeps the rows it has
                atomic_write(a.json, json.dumps({**record, "complete": False, "rows": rows}, indent=2))
    for r in rows:
        r.setdefault("ratio_median", round(r["seconds"] / rows[0]["seconds"], 3))
    shape = _shape(tiny, a.layers)
    print(f"device: {dev}; {shape}; batch {a.batch} x "
          f"({text} text + 144 image)")
    first = rows[0]["step"]
    print(f"{'step':<18}{'seconds':>9}{'x ' + first:>{max(9, len(first) + 3)}}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'peak GB':>9}{'teacher GB':>11}{'warm-up s':>10}")
    for r in rows:
        print(f"{r['step']:<18}{r['seconds']:>9.4f}{r['ratio_median']:>{max(9, len(first) + 3)}.3f}"
              f"{r['tokens_per_s']:>11.1f}{r['tflops']:>9.2f}{(r['mfu'] or 0):>7.3f}{(r['peak_mem_gb'] or 0):>9.1f}"
              f"{r['teacher_gb']:>11.2f}{r['warmup_s']:>10.1f}")
    if a.rounds > 1:
        print(f"{a.rounds} interleaved rounds of {a.steps} steps; ratio = median over rounds of the per-round ratio "
              "(min-max: " + ", ".join(f"{r['step']} {r['ratio_min']}-{r['ratio_max']}" for r in rows[1:]) + ")")
    for line in goal_lines(rows) if not tiny else []:  # the goals are set at real shapes
        print(line + (f" [both LMs cut to {a.layers} layers: the goal is for the full depth]" if a.layers else ""))
    write_json(a.json, {**record, "complete": True, "rows": rows})


def flops_main(a: argparse.Namespace, tiny: bool, device: torch.device, text: int) -> None:
    kinds = a.kinds.split(",")
    with tempfile.TemporaryDirectory(prefix="train-step-cache-") as workdir:
        rows = count_flops(kinds, tiny, device, a.batch, text, a.layers, a.cache_k, workdir)
    shape = _shape(tiny, a.layers)
    print(f"FLOPs of one step (torch.utils.flop_counter: matmuls, convolutions, attention); {shape}; batch {a.batch} x "
          f"({text} text + 144 image)")
    first = rows[0]
    w = max(9, len(first["step"]) + 3)
    print(f"{'step':<18}{'TFLOP':>9}{'x ' + first['step']:>{w}}{'full depth':>12}{'x':>7}{'aten ops':>10}"
          f"{'full depth':>12}")
    for r in rows:
        full, ops_full = r["flops_full_depth"], r["aten_ops_full_depth"]
        x_full = full / first["flops_full_depth"] if full and first["flops_full_depth"] else None
        print(f"{r['step']:<18}{r['flops'] / 1e12:>9.4g}{r['flops'] / first['flops']:>{w}.4f}"
              + (f"{full / 1e12:>12.4g}{x_full:>7.4f}" if x_full else f"{'-':>12}{'-':>7}")
              + f"{r['aten_ops']:>10}" + (f"{ops_full:>12}" if ops_full else f"{'-':>12}"))
    write_json(a.json, {"mode": "flops", "tiny": tiny, "layers": a.layers, "batch": a.batch, "text": text,
                        "cache_k": a.cache_k, "torch": torch.__version__, "rows": rows})


def write_json(path: str, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2))  # a killed run leaves the previous file whole
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
