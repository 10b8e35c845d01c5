"""Does each alignment term change what the student attends to? (issue 16, item 4)

    python benchmarks/easyvqa_alignment.py --output-dir runs/easyvqa_seeds --seeds 0-9

On held-out easy-vqa samples (test split, laid out as in training: image, question, answer), the layer-0
text→vision attention block of every student of an `easyvqa_seeds.py` study — and of each seed's
untrained student ("init": the same for every method of that seed) — against the teacher's:

  * head-averaged (the main yardstick): every model, init included, is compared on the same footing,
    whether or not it has a head adapter and whatever its adapter learned. Per text row, the block
    renormalised over the 144 vision tokens is a distribution; reported: KL(teacher ‖ student) of those
    distributions (mean over rows), the Pearson correlation of the two blocks (per sample, then mean),
    their MSE, the student's share of attention on the image, and the overlap of the 16 focus tokens
    (V-focus's own ranking, `focus_indices`, of the student's block against the teacher's; chance 16/144).
  * through the trained head adapter (kd-att and alignkd only): L_att itself, the MSE between the
    student's block and the adapter-mapped teacher block, on held-out samples. It is what the loss
    optimises, but it exists only where an adapter was trained (release's stays at random init).

Layer 0 is captured with `alignkd.distill.attention.capture_layer0_attention` and cut with
`alignkd.distill.losses.text_vision_block`, as the training loss does. Every model shares the teacher's
frozen CLIP tower, so its features are computed once per batch and fed to each model's projector.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from alignkd.data.datasets import collate, easyvqa_dataset
from alignkd.data.image import image_config
from alignkd.distill import capture_layer0_attention
from alignkd.distill.losses import HeadAdapter, attention_loss, focus_indices, text_vision_block
from alignkd.model import MobileVLM, build_model, load_model
from alignkd.model.tokenizer import load_tokenizer

METRICS = ("kl", "corr", "mse", "top16", "image_share", "l_att")
TOP_K = 16


@dataclass
class HeldOut:
    """The teacher's side, computed once: per batch the model inputs, CLIP features and the teacher's block."""

    batches: list[dict]  # input_ids, attention_mask, feats (B, 576, Dv), t_block (B_img, H_t, T_q, N), rows


@torch.no_grad()
def attention_block(model: MobileVLM, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block (B_img, H, T_q, N), row_mask (B_img, T_q), image_mask (B, T')) of one model on one batch."""
    with capture_layer0_attention(model.lm) as cap:
        out = model(batch["input_ids"], batch["attention_mask"], image_features=model.project(batch["feats"]),
                    compute_loss=False)
    block, rows = text_vision_block(cap.probs, out.image_mask, out.attention_mask)
    return block, rows, out.image_mask


@torch.no_grad()
def held_out(teacher: MobileVLM, tokenizer, n: int, seed: int, batch_size: int = 32) -> HeldOut:
    cfg = teacher.config
    ds = easyvqa_dataset("test", tokenizer, image_config(cfg), cfg.text.max_position_embeddings,
                         cfg.num_image_tokens, "v1", limit=n, seed=seed)
    batches = []
    for i in range(0, len(ds), batch_size):
        b = collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))], pad_id=cfg.text.pad_token_id)
        b["feats"] = teacher.vision_tower(b.pop("pixel_values"))  # (B, 576, Dv): the tower every model shares
        b["t_block"], b["rows"], b["image_mask"] = attention_block(teacher, b)
        batches.append(b)
    return HeldOut(batches)


def _head_adapter(student_dir: Path, t_heads: int, s_heads: int) -> HeadAdapter | None:
    """The trained head adapter saved beside a student, or None (no L_att, or frozen at random: release)."""
    path = student_dir / "train" / "adapters.safetensors"
    cfg = json.loads((student_dir / "train" / "summary.json").read_text())["config"]
    if not path.is_file() or cfg["loss"]["variant"] != "paper" or cfg["loss"]["att_weight"] == 0:
        return None
    state = {k.removeprefix("head_adapter."): v for k, v in load_file(str(path)).items() if k.startswith("head_adapter.")}
    adapter = HeadAdapter(t_heads, s_heads)
    adapter.load_state_dict(state)
    return adapter.eval()


@torch.no_grad()
def alignment(model: MobileVLM, data: HeldOut, adapter: HeadAdapter | None = None) -> dict[str, float | None]:
    """The student's layer-0 text→vision attention against the teacher's (module docstring)."""
    kl = mse = share = l_att = 0.0
    n_rows = n_cells = 0
    corr, top = [], []
    for b in data.batches:
        s_block, rows, image_mask = attention_block(model, b)
        if not torch.equal(image_mask, b["image_mask"]):
            raise ValueError("student and teacher lay the samples out differently (tokenizer or image tokens)")
        t_block = b["t_block"]
        s, t = s_block.mean(1), t_block.mean(1)  # (B_img, T_q, N) head-averaged
        keep = rows[:, :, None].expand_as(s)
        mse += float((s - t).pow(2)[keep].sum())
        n_cells += int(keep.sum())
        ps, pt = s[rows], t[rows]  # (R, N) the valid rows
        share += float(ps.sum(-1).sum())
        ps, pt = ps / ps.sum(-1, keepdim=True), pt / pt.sum(-1, keepdim=True)  # over the image only
        kl += float((pt * (pt.clamp_min(1e-12).log() - ps.clamp_min(1e-12).log())).sum())
        n_rows += int(rows.sum())
        for i in range(s.shape[0]):
            if rows[i].any():
                a, c = s[i][rows[i]].flatten(), t[i][rows[i]].flatten()
                corr.append(float(torch.corrcoef(torch.stack([a, c]))[0, 1]))
        has = rows.any(1)
        s_top = focus_indices(s_block[has], rows[has], TOP_K)  # (B', k)
        t_top = focus_indices(t_block[has], rows[has], TOP_K)
        top += [len(set(x.tolist()) & set(y.tolist())) / TOP_K for x, y in zip(s_top, t_top)]
        if adapter is not None:
            l_att += float(attention_loss(s_block, adapter(t_block), rows)) * int(rows.sum())
    return {"kl": kl / n_rows, "corr": sum(corr) / len(corr), "mse": mse / n_cells, "top16": sum(top) / len(top),
            "image_share": share / n_rows, "l_att": l_att / n_rows if adapter is not None else None}


def seed_alignment(seed_dir: Path, methods: list[str], student_preset: str, seed: int, n: int,
                   eval_seed: int) -> dict[str, dict]:
    """{init | method: metrics} for one seed's students (folders under seed_dir, teacher in seed_dir/teacher)."""
    teacher = load_model(seed_dir / "teacher").eval()
    data = held_out(teacher, load_tokenizer(seed_dir / "teacher"), n, eval_seed)
    t_heads = teacher.config.text.num_heads
    init = build_model(student_preset, seed=seed).eval()  # the weights every method of this seed starts from
    out = {"init": alignment(init, data)}
    for m in methods:
        student = load_model(seed_dir / m).eval()
        out[m] = alignment(student, data, _head_adapter(seed_dir / m, t_heads, student.config.text.num_heads))
    out["teacher_image_share"] = sum(float(b["t_block"].mean(1)[b["rows"]].sum()) for b in data.batches) / sum(
        int(b["rows"].sum()) for b in data.batches)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="runs/easyvqa_seeds", help="the easyvqa_seeds.py study folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", default="baseline,logit-kd,kd-att,kd-v,alignkd,release")
    ap.add_argument("--student-preset", default="tiny-student")
    ap.add_argument("--samples", type=int, default=512, help="held-out samples")
    ap.add_argument("--eval-seed", type=int, default=0)
    a = ap.parse_args()
    for seed in a.seeds:
        got = seed_alignment(Path(a.output_dir) / f"seed{seed}", a.methods.split(","), a.student_preset, seed,
                             a.samples, a.eval_seed)
        print(json.dumps({"seed": seed, **got}))


if __name__ == "__main__":
    main()
