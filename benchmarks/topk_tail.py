"""Which tail handling for top-k KD (the teacher cache's loss): "rest" or "renorm", measured against full KD.

    python benchmarks/topk_tail.py --work /tmp/tail          # trains (or reuses) the demo's teacher and baseline
    python benchmarks/topk_tail.py --work /tmp/smoke teacher_steps=20 student_steps=10 --batches 2   # a smoke run

On held-out easy-vqa batches, the demo's trained teacher (tiny-teacher, 600 steps) and two students — the
initialised student (where distillation starts) and the demo's trained baseline student (300 steps, CE
only: a student that is already good, not trained by either loss) — for k in --ks, T in --temperatures:

  grad cosine   cosine between the gradient of top-k KD and of full-logit KD over every trainable student
                parameter (projector + LM), per batch: does the cache point the student where full KD does?
  grad norm     |∇ top-k KD| / |∇ full KD|
  loss ratio    top-k KD / full KD (rest: a KL of coarsened distributions, ≤ 1 by the data-processing
                inequality; renorm has no such bound)
  tail mass     the teacher's probability outside its top k (what the cache does not hold)

Means over batches (and positions for the tail mass), with the min over batches of the cosine. Prints a
table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from alignkd.data.datasets import collate, easyvqa_dataset
from alignkd.data.image import image_config
from alignkd.demo import DemoConfig, student_recipe, teacher_identity, teacher_recipe, train_or_reuse
from alignkd.distill import kd_loss, kd_positions_mask, teacher_topk, topk_kd_loss
from alignkd.model.checkpoint import build_model, load_model
from alignkd.model.tokenizer import load_tokenizer
from alignkd.train.config import load_config


def _grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])


def measure(student, teacher, batches, ks, temperatures) -> list[dict]:
    params = [p for p in student.parameters() if p.requires_grad]
    acc: dict[tuple, dict[str, list[float]]] = {}
    for batch in batches:
        with torch.no_grad():
            t_logits = teacher(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                               compute_loss=False).logits  # (B, T, V)
        s = student(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                    compute_loss=False)
        pos = kd_positions_mask(s.labels, s.attention_mask, "text")  # (B, T)
        for temp in temperatures:
            full = kd_loss(s.logits, t_logits, s.labels, s.attention_mask, temp, "text")
            g_full = _grad(full, params)
            for k in ks:
                logp, ids = teacher_topk(t_logits[pos], k, temp)  # (M, k)
                tail_mass = (1 - logp.exp().sum(-1)).clamp(min=0)  # (M,)
                for tail in ("rest", "renorm"):
                    loss = topk_kd_loss(s.logits[pos], logp, ids, temp, tail)
                    g = _grad(loss, params)
                    row = acc.setdefault((k, temp, tail), {"cos": [], "norm": [], "loss": [], "tail": []})
                    row["cos"].append(float(torch.nn.functional.cosine_similarity(g, g_full, dim=0)))
                    row["norm"].append(float(g.norm() / g_full.norm()))
                    row["loss"].append(float(loss.detach() / full.detach()))
                    row["tail"].append(float(tail_mass.mean()))
    return [{"k": k, "temperature": temp, "tail": tail, "grad_cosine": sum(v["cos"]) / len(v["cos"]),
             "grad_cosine_min": min(v["cos"]), "grad_norm_ratio": sum(v["norm"]) / len(v["norm"]),
             "loss_ratio": sum(v["loss"]) / len(v["loss"]), "teacher_tail_mass": sum(v["tail"]) / len(v["tail"])}
            for (k, temp, tail), v in acc.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/topk_tail", help="the demo's output_dir (teacher/, baseline/)")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ks", default="8,32")
    ap.add_argument("--temperatures", default="1,2")
    ap.add_argument("--json", default="benchmarks/topk_tail.json")
    ap.add_argument("overrides", nargs="*", help="the demo's key=value (teacher_steps=, student_steps=, ...)")
    a = ap.parse_args()
    d = load_config(None, a.overrides, cls=DemoConfig, flags={"output_dir": a.work, "progress": False})
    train_or_reuse(teacher_recipe(d))
    train_or_reuse(student_recipe(d, "baseline"), teacher_identity(d))
    teacher = load_model(Path(a.work) / "teacher").eval()
    tok = load_tokenizer(Path(a.work) / "teacher")
    init = build_model(d.student_preset, seed=d.seed)
    init.vision_tower.load_state_dict(teacher.vision_tower.state_dict())  # as the recipe's init_vision_from
    trained = load_model(Path(a.work) / "baseline")
    ds = easyvqa_dataset("test", tok, image_config(teacher.config), 512, teacher.config.num_image_tokens, "v1",
                         limit=a.batches * a.batch_size, seed=1)
    batches = [collate([ds[i] for i in range(j, j + a.batch_size)], teacher.config.text.pad_token_id)
               for j in range(0, len(ds), a.batch_size)]
    ks, temps = [int(k) for k in a.ks.split(",")], [float(t) for t in a.temperatures.split(",")]
    rows = []
    for name, student in (("initialised student", init), ("trained baseline student", trained)):
        student.train().requires_grad_(True).vision_tower.requires_grad_(False)  # as the recipe trains it
        for r in measure(student, teacher, batches, ks, temps):
            rows.append({"student": name, **r})
    print(f"{len(batches)} held-out easy-vqa batches of {a.batch_size}; the demo's teacher; KD on answer positions")
    print(f"{'student':<26}{'k':>4}{'T':>5}{'tail':>8}{'grad cos':>10}{'(min)':>8}{'|g|/|g_full|':>14}"
          f"{'loss/full':>11}{'teacher tail':>14}")
    for r in rows:
        print(f"{r['student']:<26}{r['k']:>4}{r['temperature']:>5.1f}{r['tail']:>8}{r['grad_cosine']:>10.4f}"
              f"{r['grad_cosine_min']:>8.3f}{r['grad_norm_ratio']:>14.3f}{r['loss_ratio']:>11.3f}"
              f"{r['teacher_tail_mass']:>14.2e}")
    Path(a.json).write_text(json.dumps({"rows": rows, "batches": len(batches), "batch_size": a.batch_size}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
