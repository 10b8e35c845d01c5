"""The trained student's model card: README.md beside its weights, in the Hugging Face Hub's form (YAML front
matter, then Markdown), so the folder says what it is when it is shared or uploaded.

Everything in it comes from the run's summary (train/summary.json): what was distilled from what, on which
data, with which loss weights, and the losses of the last step. It holds no accuracy: `alignkd-mobile eval`
measures that, beside the baseline.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..distill import LOSS_TERMS

_METHODS = {  # method: (how the student was made, what its loss is)
    "alignkd": ("distilled with Align-KD (CVPR 2025)",
                "cross-entropy + logit KD + the first layer's text→vision attention aligned with the teacher's "
                "(L_att) + the projected vision tokens pulled toward the teacher's, all of them and those the text "
                "attends to most (V-all, V-focus)"),
    "logit-kd": ("distilled with logit KD", "cross-entropy + KL to the teacher's next-token distribution"),
    "baseline": ("trained without a teacher (the undistilled baseline)", "cross-entropy only"),
}


# The Hub's base_model must name a model there: only the released checkpoints' folder names are mapped (a local
# folder of another name may be anything, and is named in the text instead)
HUB_IDS = {name: f"mtgv/{name}" for name in ("MobileVLM_V2-1.7B", "MobileVLM_V2-3B", "MobileVLM_V2-7B",
                                               "MobileVLM-1.7B", "MobileVLM-3B")}


def _name(path_or_preset: str | None) -> str | None:
    """A checkpoint folder's name (MobileVLM_V2-1.7B), or a preset's name as it is."""
    return Path(path_or_preset).name if path_or_preset else None


def model_card(summary: dict, cache_k: int | None = None) -> str:
    """README.md for the student `summary` describes. cache_k: the top-k of the teacher cache the run read."""
    cfg, final = summary["config"], summary.get("final") or {}
    loss, data = cfg["loss"], cfg["data"]
    student, teacher = _name(cfg["student"]), _name(cfg["teacher"])
    distilled = cfg["method"] != "baseline"
    front = {"pipeline_tag": "image-text-to-text",
             "tags": ["mobilevlm", "alignkd-mobile", *(["knowledge-distillation"] if distilled else []),
                      *(["align-kd"] if cfg["method"] == "alignkd" else [])]}
    if Path(cfg["student"]).is_dir() and student in HUB_IDS:  # a released checkpoint, kept under its name
        front["base_model"] = HUB_IDS[student]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {Path(summary['output_dir']).name}", "",
             f"A MobileVLM V2 student ({student}) {_METHODS[cfg['method']][0]} by alignkd-mobile: "
             f"{_METHODS[cfg['method']][1]}."]
    if distilled:
        source = "the whole teacher online"
        if cfg["teacher_cache"]:  # Align-KD's terms still read the teacher's layer 0; logit KD reads nothing else
            source = (f"its top-{cache_k} log-probs cached once (`teacher-cache`, {cfg['teacher_cache']})"
                      + ("; the teacher's layer 0 online" if cfg["method"] == "alignkd" else ""))
        lines.append(f"Teacher: {teacher}, {source}.")
    terms = ["CE"]
    if distilled:
        terms.append(f"{loss['kd_weight']} × KD (T = {loss['temperature']}, {loss['kd_positions']} positions"
                     + (f", top-{cache_k or loss['kd_topk']} + {loss['kd_tail']}" if cache_k or loss["kd_topk"] else "")
                     + ")")
    if cfg["method"] == "alignkd":
        terms += [f"{loss['att_weight']} × L_att", f"{loss['v_weight']} × (V-all + V-focus, top {loss['top_k']})"]
    batch = cfg["batch_size"] * cfg["grad_accum"]
    rows = [("data", f"{data['path']}" + (f" (images in {data['image_folder']})" if data["image_folder"] else "")
             + (f", first {data['limit']} samples" if data["limit"] else "")),
            ("steps", f"{summary['steps']} × batch {batch}"
             + (f" ({cfg['batch_size']} × {cfg['grad_accum']} accumulated)" if cfg["grad_accum"] > 1 else "")),
            ("learning rate", f"{cfg['lr']}: warm-up over {cfg['warmup_ratio']:.0%} of the steps, then cosine to "
                              f"{cfg['min_lr_ratio']} × that; weight decay {cfg['weight_decay']}"),
            ("loss", " + ".join(terms) + (f" ({loss['variant']} variant)" if cfg["method"] == "alignkd" else "")),
            ("vision tower", "trained" if cfg["train_vision_tower"] else "frozen"),
            ("seed", str(cfg["seed"])),
            ("wall time", f"{summary['wall_s']} s")]
    skipped = {k: summary.get(k) for k in ("dropped_too_long", "skipped_malformed", "skipped_not_in_cache")}
    if any(skipped.values()):
        rows.append(("samples left out", ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items() if v)))
    lines += ["", "| training | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    shown = [k for k in LOSS_TERMS if final.get(k)]
    if shown:
        lines += ["", f"Losses at the last step ({final['step']}):", "",
                  "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown),
                  "| " + " | ".join(f"{final[k]:.4f}" for k in shown) + " |"]
    out = summary["output_dir"]
    bench = "easyvqa" if data["path"] == "easyvqa" else "gqa,sqa,textvqa,pope,mme,mmbench --data-root DATA"
    lines += ["", "## Use", "",
              "The folder is a MobileVLM (mtgv) checkpoint: config.json, model.safetensors, the tokenizer and "
              "vision_tower/. Accuracy is not in this card; measure it beside the baseline:", "", "```bash",
              f"alignkd-mobile eval {out} BASELINE_DIR --bench {bench}",
              f"alignkd-mobile export {out} --target android --output-dir bundles/{Path(out).name}",
              "```", "",
              "train/config.yaml holds the run's whole config, train/metrics.jsonl every logged step, "
              "train/loss_curve.png the curves."]
    return "\n".join(lines) + "\n"
