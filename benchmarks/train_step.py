"""One training step at real shapes, three ways, measured in one run:

  plain      the student alone (CE), as the baseline trains
  alignkd    our Align-KD step: one shared CLIP forward, SDPA everywhere, layer-0 capture by hooks,
             KD on answer positions, teacher frozen in bf16
  release    the public release's computation: eager attention with attentions on every layer in both
             models, CLIP run twice, KD on every position

    python benchmarks/train_step.py                  # GPU: 1.7B student + 7B teacher, random weights, bf16
    python benchmarks/train_step.py --tiny           # CPU: tiny presets (what this machine can run)

Batch 8 × (144 image + 512 text) positions by default. Student: fp32 master weights + bf16 autocast +
AdamW (as users train). Prints a table (time, tokens/s, MFU, peak memory) with ratios to the plain step,
and writes JSON. DESIGN.md §2 anchors (one H200): plain 0.124-0.140 s, lean Align-KD 0.302 s, release 0.386 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from alignkd.distill import AlignKDLoss, AlignKDLossConfig, DistillInputs
from alignkd.model import IMAGE_TOKEN_INDEX, MobileVLM, get_preset
from alignkd.train.config import TrainConfig
from alignkd.train.recipe import Run, _micro_step, _param_groups

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _models(tiny: bool, device: torch.device, attn: str, with_teacher: bool):
    s_name, t_name = ("tiny-student", "tiny-teacher") if tiny else ("mobilevlm-v2-1.7b", "mobilevlm-v2-7b")
    torch.manual_seed(0)
    with device:
        student = MobileVLM(get_preset(s_name), attn_implementation=attn)
        if not with_teacher:
            return student, None
        teacher = MobileVLM(get_preset(t_name), attn_implementation=attn)
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


def measure(kind: str, tiny: bool, device: torch.device, b: int, text: int, steps: int) -> dict:
    attn = "eager" if kind == "release" else "sdpa"
    student, teacher = _models(tiny, device, attn, with_teacher=kind != "plain")
    ref = teacher or student
    method = "baseline" if kind == "plain" else "alignkd"
    cfg = TrainConfig(method=method, teacher="bench" if method != "baseline" else None, steps=steps,
                      variant="release" if kind == "release" else "paper", progress=False)
    loss_cfg = AlignKDLossConfig(*((0.0, 0.0, 0.0) if kind == "plain" else (1.0, 1.0, 1.0)), variant=cfg.variant)
    loss_fn = AlignKDLoss(loss_cfg, ref.config.text.num_heads, student.config.text.num_heads,
                          ref.config.text.hidden_size, student.config.text.hidden_size).to(device)
    opt = torch.optim.AdamW(_param_groups(student, loss_fn, cfg), fused=device.type == "cuda")
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    run = Run(cfg, None, device, 0, 1, None, student, teacher, loss_fn, None, opt, None, True, amp_dtype)
    batch = _batch(student, b, text, device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):  # first step warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if kind == "release":
            _release_micro_step(student, teacher, loss_fn, batch, amp)
        else:
            _micro_step(run, batch, 1.0)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
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
    row = {"step": kind, "seconds": round(t, 4), "tokens_per_s": round(n_tok / t, 1),
           "tflops": round(flops / t / 1e12, 2), "mfu": round(flops / t / peak, 3) if peak else None,
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if device.type == "cuda" else None}
    del student, teacher, ref, opt, run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny presets (default on a machine without CUDA)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default="benchmarks/train_step.json")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = a.tiny or device.type != "cuda"
    text = a.text if not tiny else min(a.text, 128)
    rows = [measure(k, tiny, device, a.batch, text, a.steps) for k in ("plain", "alignkd", "release")]
    base = rows[0]["seconds"]
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {dev}; {'tiny presets' if tiny else '1.7B student + 7B teacher'}; batch {a.batch} x "
          f"({text} text + 144 image)")
    print(f"{'step':<10}{'seconds':>9}{'x plain':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}")
    for r in rows:
        print(f"{r['step']:<10}{r['seconds']:>9.4f}{r['seconds'] / base:>9.2f}{r['tokens_per_s']:>11.1f}{r['tflops']:>9.2f}"
              f"{(r['mfu'] or 0):>7.3f}{(r['peak_mem_gb'] or 0):>9.1f}")
    with open(a.json, "w") as f:
        json.dump({"device": dev, "tiny": tiny, "batch": a.batch, "text": text, "rows": rows}, f, indent=2)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
