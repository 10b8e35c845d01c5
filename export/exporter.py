"""`alignkd-mobile export`: checkpoint → artifacts per format × quantization → parity gate → bundle.

Export knows nothing of training: it takes an mtgv checkpoint directory. Every artifact is loaded back
into its desktop runtime and checked against the eager model on a fixed image and prompt; a failed check
fails the export (non-zero exit) and the bundle is left without `manifest.json`, i.e. not complete.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from alignkd.data import easyvqa
from alignkd.data.image import image_config, load_image, preprocess
from alignkd.data.templates import IMAGE_TOKEN, build_prompt, get_template
from alignkd.data.tokenize import tokenize_prompt
from alignkd.errors import AlignKDError, ConfigError, DataError
from alignkd.model.checkpoint import load_model
from alignkd.model.config import IMAGE_TOKEN_INDEX
from alignkd.model.tokenizer import COPIED_FILES, load_tokenizer

from .base import ExportOptions, ExportTarget
from alignkd.fileio import StagedDir

from .bundle import write_manifest
from .parity import Thresholds, check_parity

# The comparison with the same-quantization eager model is reported, not gated: its tolerances depend on
# kernel details (e.g. XNNPACK keeps int4 group scales in bf16).
REPORT_ONLY = Thresholds(image_cos=-1.0, logits_rel=float("inf"), top1=0.0, exact_tokens=False)

# format name → (module, class): imported on use, so one target's heavy runtime loads only when asked
TARGETS: dict[str, tuple[str, str]] = {
    "pte": ("alignkd.export.executorch", "ExecuTorchTarget"),
    "onnx": ("alignkd.export.onnx_export", "OnnxTarget"),
    "gguf": ("alignkd.export.gguf_export", "GgufTarget"),
}
DEFAULT_QUANT = {"pte": "8da4w", "onnx": "int4", "gguf": "q4_0"}
PARITY_QUESTION = "What shape is in the image?"
DEVICE_DIR = "/data/local/tmp/alignkd"


class ExportFailed(AlignKDError):
    """The parity gate failed for at least one artifact."""


def get_target(name: str) -> ExportTarget:
    if name not in TARGETS:
        raise ConfigError(f"unknown export format {name!r} (supported: {', '.join(TARGETS)})")
    module, cls = TARGETS[name]
    return getattr(importlib.import_module(module), cls)()


def parity_image() -> "Image.Image":
    """A fixed real image: the first easy-vqa test image (ships in the easy-vqa package)."""
    return load_image(easyvqa.first_test_image())


def parity_inputs(model, tokenizer, template: str = "v1") -> tuple[list[int], np.ndarray]:
    ids = tokenize_prompt(build_prompt(template, PARITY_QUESTION), tokenizer)
    pixels = preprocess(parity_image(), image_config(model.config))[None].numpy()  # (1, 3, S, S)
    return ids, pixels


def sentencepiece_vocab(model_file: Path) -> dict:
    """pieces / scores / types of a SentencePiece model as JSON: what the app's encoder reads."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    ns = proto.normalizer_spec
    return {
        "model_type": {1: "unigram", 2: "bpe"}.get(proto.trainer_spec.model_type, str(proto.trainer_spec.model_type)),
        "add_dummy_prefix": ns.add_dummy_prefix,
        "remove_extra_whitespaces": ns.remove_extra_whitespaces,
        "byte_fallback": proto.trainer_spec.byte_fallback,
        "unk_id": proto.trainer_spec.unk_id, "bos_id": proto.trainer_spec.bos_id, "eos_id": proto.trainer_spec.eos_id,
        # type: 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte
        "pieces": [[p.piece, p.score, p.type] for p in proto.pieces],
    }


def _parse_jobs(formats: list[str], quants: list[str] | None) -> list[tuple[str, str]]:
    """`--format pte,gguf --quant 8da4w,q4_0` → [(pte, 8da4w), (gguf, q4_0)]; a quant applies to every
    format that supports it; a format with none of the given quants uses its default."""
    jobs = []
    for fmt in formats:
        target = get_target(fmt)
        if not quants:
            jobs.append((fmt, DEFAULT_QUANT[fmt]))
            continue
        mine = [q for q in quants if q in target.quants]
        unknown = [q for q in quants if not any(q in get_target(f).quants for f in formats)]
        if unknown:
            raise ConfigError(f"quantization {', '.join(unknown)} is not supported by {', '.join(formats)}; "
                              + "; ".join(f"{f}: {', '.join(get_target(f).quants)}" for f in formats))
        if not mine:
            raise ConfigError(f"none of --quant {','.join(quants)} applies to {fmt} (supported: {', '.join(target.quants)})")
        jobs.extend((fmt, q) for q in mine)
    return jobs


def export_bundle(checkpoint: str | Path, out_dir: str | Path, formats: list[str], quants: list[str] | None = None,
                  target: str = "android", overwrite: bool = False, max_seq_len: int = 512, group_size: int | None = None,
                  threads: int = 2, template: str = "v1", embedding_quant: str | None = None, log=print) -> dict:
    """Export, gate, and write the bundle. Returns the manifest."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if target not in ("android", "desktop"):
        raise ConfigError(f"--target must be android or desktop, got {target!r}")
    if target == "android" and "pte" not in formats:
        raise ConfigError("--target android needs the ExecuTorch format (pte): the app runs the .pte")
    jobs = _parse_jobs(formats, quants)
    model = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    prompt_ids, pixels = parity_inputs(model, tokenizer, template)
    report: dict = {"prompt_ids": prompt_ids, "question": PARITY_QUESTION, "artifacts": {}}
    artifacts = []
    failed = []
    staged = StagedDir(out_dir, overwrite, exists_error=DataError)
    with staged as stage:
        for fmt, quant in jobs:
            t = get_target(fmt)
            opts = ExportOptions(quant=quant, max_seq_len=max_seq_len, group_size=group_size, threads=threads,
                                 embedding_quant=embedding_quant if fmt == "pte" else None)
            sub = stage / fmt / quant
            sub.mkdir(parents=True)
            log(f"export {fmt} {quant} ...")
            files = t.export(model, tokenizer, sub, opts)
            gate = t.thresholds(opts) if hasattr(t, "thresholds") else thresholds(fmt, quant)
            rep = check_parity(t.load(sub, opts), t.reference(model, opts), prompt_ids, pixels, gate)
            if quant != "fp32" and hasattr(t, "quantized_reference"):
                same = check_parity(t.load(sub, opts), t.quantized_reference(model, opts, sub), prompt_ids, pixels,
                                    REPORT_ONLY)
                rep["same_quant_reference"] = {k: same[k] for k in
                                               ("logits_rel", "logits_cos", "top1_agreement", "greedy_identical")}
            if fmt == "gguf":
                from .gguf_export import faithful_divergence

                rep["faithful_divergence"] = faithful_divergence(model, t.load(sub, opts), prompt_ids, pixels)
            report["artifacts"][f"{fmt}/{quant}"] = rep
            log(f"  parity {'PASS' if rep['passed'] else 'FAIL'}: logits rel {rep['logits_rel']:.2e}, "
                f"top-1 {rep['top1_agreement']:.3f}, greedy identical {rep['greedy_identical']}"
                + ("" if rep["passed"] else f"  ({'; '.join(rep['failures'])})"))
            if not rep["passed"]:
                failed.append(f"{fmt}/{quant}")
            artifacts.append({"format": fmt, "quant": quant, "dir": f"{fmt}/{quant}",
                              "files": sorted(p.relative_to(stage).as_posix() for p in files),
                              "parity_passed": rep["passed"]})
        write_bundle_metadata(stage, model, tokenizer, checkpoint, template)
        (stage / "parity_report.json").write_text(json.dumps(report, indent=2))
        if failed:
            # kept for inspection, but with no manifest: every reader refuses an incomplete bundle
            dest = out_dir.with_name(out_dir.name + ".failed")
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(stage, dest)
            raise ExportFailed(f"parity gate failed for {', '.join(failed)}; artifacts and parity_report.json left in "
                               f"{out_dir.name}.failed (not a complete bundle)")
        c = model.config
        manifest = write_manifest(stage, {
            "target": target,
            "model": {"preset": c.name, "checkpoint": str(checkpoint), "hidden_size": c.text.hidden_size,
                      "vocab_size": c.text.vocab_size, "num_image_tokens": c.num_image_tokens,
                      "image_size": c.vision.image_size, "bos_id": c.text.bos_token_id,
                      "eos_ids": [c.text.eos_token_id], "pad_id": c.text.pad_token_id, "max_seq_len": max_seq_len},
            "preprocessing": "preprocessing.json",
            "template": "template.json",
            "tokenizer": "tokenizer/tokenizer.model",
            "vocab": "tokenizer/vocab.json",
            "artifacts": artifacts,
            "parity": {k: {"passed": v["passed"], "logits_rel": v["logits_rel"], "top1_agreement": v["top1_agreement"],
                           "greedy_identical": v["greedy_identical"], **({"image_cos": v["image_cos"]} if "image_cos" in v else {})}
                       for k, v in report["artifacts"].items()},
        })
        staged.publish()
    return manifest


def thresholds(fmt: str, quant: str):
    module, _ = TARGETS[fmt]
    table = importlib.import_module(module).THRESHOLDS
    return table[quant]


def write_bundle_metadata(stage: Path, model, tokenizer, checkpoint: Path, template: str) -> None:
    (stage / "preprocessing.json").write_text(json.dumps(image_config(model.config).to_dict(), indent=2))
    t = get_template(template)
    (stage / "template.json").write_text(json.dumps({
        "name": t.name, "system": t.system, "roles": list(t.roles), "sep": t.sep, "sep2": t.sep2,
        "prompt_format": build_prompt(template, "{question}"), "image_token": IMAGE_TOKEN, "image_token_index": IMAGE_TOKEN_INDEX,
        "bos_id": model.config.text.bos_token_id, "stop_ids": [model.config.text.eos_token_id],
    }, indent=2))
    tok_dir = stage / "tokenizer"
    tok_dir.mkdir()
    src = getattr(tokenizer, "alignkd_source_dir", checkpoint)
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tok_dir / name)
    if not (tok_dir / "tokenizer.model").is_file():
        raise DataError(f"{checkpoint}: the bundle needs the SentencePiece tokenizer.model, which is missing")
    (tok_dir / "vocab.json").write_text(json.dumps(sentencepiece_vocab(tok_dir / "tokenizer.model")))


def push_bundle(bundle: Path, serial: str | None = None) -> str:
    """adb push the bundle to /data/local/tmp/alignkd/<name>; one clear error without adb or a device."""
    adb = shutil.which("adb")
    if adb is None:
        raise DataError("--push needs adb on PATH (Android platform-tools); none was found")
    base = [adb] + (["-s", serial] if serial else [])
    state = subprocess.run(base + ["get-state"], capture_output=True, text=True)
    if state.returncode != 0 or state.stdout.strip() != "device":
        raise DataError(f"no Android device ready for adb ({(state.stderr or state.stdout).strip() or 'no device'})")
    dest = f"{DEVICE_DIR}/{bundle.name}"
    for cmd in (["shell", "mkdir", "-p", DEVICE_DIR], ["push", str(bundle), f"{DEVICE_DIR}/"]):
        r = subprocess.run(base + cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise DataError(f"adb {' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()}")
    return dest
