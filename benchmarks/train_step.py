"""One training step at real shapes, three ways, measured in one run:

  plain      the student alone (CE), as the baseline trains
  logit-kd   plain + the frozen teacher's forward + KD (the cost of the teacher alone)
  alignkd    our Align-KD step: one shared CLIP forward, SDPA everywhere, layer-0 capture by hooks,
             KD on answer positions, teacher frozen in bf16
  +compile   the same step with compile=true (each transformer block but LM layer 0 torch.compiled)
  release    the public release's computation: eager attention with attentions on every layer in both
             models, CLIP run twice, KD on every position

    python benchmarks/train_step.py                  # GPU: 1.7B student + 7B teacher, random weights, bf16
    python benchmarks/train_step.py --tiny           # CPU: tiny presets (what this machine can run)
    python benchmarks/train_step.py --layers 1 --batch 1 --text 32   # real widths, one layer: a smoke run

Batch 8 × (144 image + 512 text) positions by default. Student: fp32 master weights + bf16 autocast +
AdamW (as users train). Prints a table (time, tokens/s, MFU, peak memory) with ratios to the plain step,
and writes JSON. The measured numbers are in the README (Results) and DESIGN.md §2.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time

import torch

from alignkd.distill import DistillInputs
from alignkd.distill.attention import capture_layer0_attention
from torch.profiler import ProfilerActivity, profile, record_function
from alignkd.model import IMAGE_TOKEN_INDEX, MobileVLM, get_preset
from alignkd.train.config import load_config
from alignkd.train.recipe import Run, compile_blocks, make_loss, make_optimizer, micro_step

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _config(name: str, layers: int | None):
    cfg = get_preset(name)
    if layers:  # keep every width, cut the depth: the real-shape code path on a small machine
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=layers))
    return cfg


def _models(tiny: bool, device: torch.device, attn: str, with_teacher: bool, layers: int | None):
    s_name, t_name = ("tiny-student", "tiny-teacher") if tiny else ("mobilevlm-v2-1.7b", "mobilevlm-v2-7b")
    torch.manual_seed(0)
    with device:
        student = MobileVLM(_config(s_name, layers), attn_implementation=attn)
        if not with_teacher:
            return student, None
        teacher = MobileVLM(_config(t_name, layers), attn_implementation=attn)
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
    with profile(activities=acts) as prof:
        one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    ev = prof.key_averages()
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    phases = ("student_forward", "teacher_forward", "losses", "backward", "clip_and_optimizer")
    got = {e.key: getattr(e, attr) / 1e3 for e in ev if e.key in phases}
    print(f"[{kind}] phase ms ({attr}): " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()), flush=True)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(ev.table(sort_by=sort, row_limit=rows, max_name_column_width=60), flush=True)


def measure(kind: str, tiny: bool, device: torch.device, b: int, text: int, steps: int, layers: int | None,
            profile: bool = False) -> dict:
    kind, compiled = kind.removesuffix("+compile"), kind.endswith("+compile")
    attn = "eager" if kind == "release" else "sdpa"
    student, teacher = _models(tiny, device, attn, with_teacher=kind != "plain", layers=layers)
    if compiled:  # as the recipe does with compile=true
        compile_blocks(student, teacher)
    ref = teacher or student
    method = {"plain": "baseline", "logit-kd": "logit-kd"}.get(kind, "alignkd")
    cfg = load_config(flags={"method": method, "teacher": "bench" if method != "baseline" else None, "steps": steps,
                             "loss.variant": "release" if kind == "release" else "paper", "progress": False})
    loss_fn = make_loss(cfg, student, teacher).to(device)
    opt = make_optimizer(student, loss_fn, cfg, device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    run = Run(cfg, None, device, 0, 1, None, student, teacher, loss_fn, None, opt, None, True, amp_dtype)
    batch = _batch(student, b, text, device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)
    times, warm_times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    def one_step():
        opt.zero_grad(set_to_none=True)
        if kind == "release":
            _release_micro_step(student, teacher, loss_fn, batch, amp)
        else:
            micro_step(run, batch, 1.0)
        with record_function("clip_and_optimizer"):
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()

    warmup = 3 if compiled else 1  # compiling takes the first steps (grad-mode and shape guards settle)
    for i in range(steps + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        (times if i >= warmup else warm_times).append(time.perf_counter() - t0)
    t = statistics.median(times)
    if profile:
        _profile(kind, one_step, device)
    n_tok = b * (text + student.config.num_image_tokens)
    s_params = sum(p.numel() for p in student.lm.parameters()) + sum(p.numel() for p in student.mm_projector.parameters())
    v_params = sum(p.numel() for p in student.vision_tower.parameters())
    t_params = sum(p.numel() for p in ref.lm.parameters()) + sum(p.numel() for p in ref.mm_projector.parameters())
    patches = b * (student.config.vision.num_patches + 1)
    flops = 6 * s_params * n_tok + 2 * v_params * patches * (1 if kind != "release" else 2)
    if kind != "plain":
        flops += 2 * t_params * n_tok
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    row = {"step": kind + ("+compile" if compiled else ""), "seconds": round(t, 4), "tokens_per_s": round(n_tok / t, 1),
           "tflops": round(flops / t / 1e12, 2), "mfu": round(flops / t / peak, 3) if peak else None,
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if device.type == "cuda" else None,
           "warmup_s": round(sum(warm_times), 1)}
    del student, teacher, ref, opt, run, loss_fn, batch
    gc.collect()  # module graphs hold cycles: free them before the next kind builds its models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny presets (default on a machine without CUDA)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None, help="cut both LMs to this many layers (smoke runs)")
    ap.add_argument("--profile", action="store_true", help="after timing, profile one step of each kind")
    ap.add_argument("--kinds", default="plain,logit-kd,alignkd,release,plain+compile,alignkd+compile",
                    help="which steps, comma-separated (+compile: with compile=true)")
    ap.add_argument("--json", default="benchmarks/train_step.json")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = a.tiny or (device.type != "cuda" and not a.layers)  # --layers asks for real widths anywhere
    text = a.text if not tiny else min(a.text, 128)
    check = check_capture(tiny, device, a.batch, text, a.layers)
    print(f"layer-0 capture vs eager output_attentions ({'bf16 autocast' if device.type == 'cuda' else 'fp32'}): "
          f"max |diff| {check['max_abs']:.2e}, mean {check['mean_abs']:.2e}, row-sum error {check['row_sum_err']:.2e}, "
          f"q_proj grad norm {check['q_proj_grad_norm']:.3e}", flush=True)
    rows = []
    for k in a.kinds.split(","):
        rows.append(measure(k, tiny, device, a.batch, text, a.steps, a.layers, a.profile))
        print(f"  {k}: {rows[-1]['seconds']:.4f} s/step", flush=True)
    base = rows[0]["seconds"]
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    shape = "tiny presets" if tiny else "1.7B student + 7B teacher" + (f" cut to {a.layers} layers" if a.layers else "")
    print(f"device: {dev}; {shape}; batch {a.batch} x "
          f"({text} text + 144 image)")
    print(f"{'step':<16}{'seconds':>9}{'x plain':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}{'warm-up s':>10}")
    for r in rows:
        print(f"{r['step']:<16}{r['seconds']:>9.4f}{r['seconds'] / base:>9.2f}{r['tokens_per_s']:>11.1f}{r['tflops']:>9.2f}"
              f"{(r['mfu'] or 0):>7.3f}{(r['peak_mem_gb'] or 0):>9.1f}{r['warmup_s']:>10.1f}")
    with open(a.json, "w") as f:
        json.dump({"device": dev, "tiny": tiny, "layers": a.layers, "batch": a.batch, "text": text,
                   "torch": torch.__version__, "capture_check": check, "rows": rows}, f, indent=2)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
