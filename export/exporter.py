"""`alignkd-mobile export`: checkpoint → artifacts per format × quantization → parity gate → bundle.

Export knows nothing of training: it takes an mtgv checkpoint directory. Every artifact is loaded back
into its desktop runtime and checked against the eager model on a fixed image and prompt; a failed check
fails the export (non-zero exit) and the bundle is left without `manifest.json`, i.e. not complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch

from alignkd.data.image import image_config
from alignkd.data.templates import IMAGE_TOKEN, build_prompt, get_template
from alignkd.errors import AlignKDError, ConfigError, DataError
from alignkd.fileio import StagedDir, check_replaceable_dir
from alignkd.model.checkpoint import load_model
from alignkd.model.config import IMAGE_TOKEN_INDEX
from alignkd.model.tokenizer import COPIED_FILES, load_tokenizer

from .base import TARGETS, ExportOptions, get_target, option_names
from .bundle import BUNDLE_FILES, DEVICE_DIR, write_manifest
from .parity import PARITY_QUESTION, gate, parity_inputs

ANDROID_FORMAT = "pte"  # the app runs the .pte


class ExportFailed(AlignKDError):
    """The parity gate failed for at least one artifact."""


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


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _parse_jobs(formats: list[str], quants: list[str] | None) -> list[tuple[str, str]]:
    """`--format pte,gguf --quant 8da4w,q4_0` → [(pte, 8da4w), (gguf, q4_0)]; a quant applies to every
    format that supports it; a format with none of the given quants uses its default."""
    targets = {f: get_target(f) for f in formats}
    if quants is not None and not quants:
        raise ConfigError("--quant names no quantization (leave it out for each format's default)")
    quants = _unique(quants or [])
    unknown = [q for q in quants if not any(q in t.quants for t in targets.values())]
    if unknown:
        raise ConfigError(f"quantization {', '.join(unknown)} is not supported by {', '.join(formats)}; "
                          + "; ".join(f"{f}: {', '.join(t.quants)}" for f, t in targets.items()))
    jobs = []
    for fmt, target in targets.items():
        mine = [q for q in quants if q in target.quants] if quants else [target.default_quant]
        if not mine:
            raise ConfigError(f"none of --quant {','.join(quants)} applies to {fmt} (supported: {', '.join(target.quants)})")
        jobs.extend((fmt, q) for q in mine)
    return jobs


def split_options(formats: list[str], options: dict) -> dict[str, dict]:
    """{"key" or "fmt.key": value} → {fmt: {key: value}}: a bare key goes to every format that has that option,
    "fmt.key" to that format only (which refuses a key it does not know)."""
    per: dict[str, dict] = {f: {} for f in formats}
    for key, value in options.items():
        fmt, _, name = key.rpartition(".")
        if fmt:
            if fmt not in per:
                raise ConfigError(f"option {key}: format {fmt!r} is not exported here (formats: {', '.join(formats)})")
            per[fmt][name] = value
            continue
        takers = [f for f in formats if name in option_names(get_target(f))]
        if not takers:
            known = "; ".join(f + ": " + (", ".join(option_names(get_target(f))) or "none") for f in formats)
            raise ConfigError(f"option {name!r} belongs to none of the formats exported ({known})")
        for f in takers:
            per[f][name] = value
    return per


def export_bundle(checkpoint: str | Path, out_dir: str | Path, formats: list[str], quants: list[str] | None = None,
                  target: str = "android", overwrite: bool = False, max_seq_len: int = 512, threads: int = 2,
                  template: str = "v1", options: dict | None = None, allow_failed_parity: bool = False,
                  log=print) -> dict:
    """Export, gate, and write the bundle. Returns the manifest.

    options: the targets' own options (`split_options`), e.g. {"group_size": 64, "pte.vision_quant": "fp32"}.
    Every request is checked (formats, quants, options, max_seq_len against the model) before anything is
    exported. The model is loaded in float32: every target quantizes from it and the references compute in it.
    allow_failed_parity: write the bundle even when an artifact fails its gate (speed runs on random weights,
    whose near-flat logits flip top-1 on near-ties); the manifest keeps each artifact's `parity_passed`, and
    `run` / `bench` warn about such a bundle.
    """
    checkpoint, out_dir = Path(checkpoint), check_replaceable_dir(out_dir, inputs=(checkpoint,))
    if target not in ("android", "desktop"):
        raise ConfigError(f"--target must be android or desktop, got {target!r}")
    formats = _unique(formats)
    if not formats:
        raise ConfigError(f"no export format given (supported: {', '.join(TARGETS)})")
    if target == "android" and ANDROID_FORMAT not in formats:
        raise ConfigError(f"--target android needs the ExecuTorch format ({ANDROID_FORMAT}): the app runs the .pte")
    jobs = _parse_jobs(formats, quants)
    extra = split_options(formats, options or {})
    if max_seq_len < 1:
        raise ConfigError(f"--max-seq-len must be positive, got {max_seq_len}")
    model = load_model(checkpoint, dtype=torch.float32)
    tokenizer = load_tokenizer(checkpoint)
    plans = [(fmt, quant, get_target(fmt), ExportOptions(quant, max_seq_len, threads, extra[fmt])) for fmt, quant in jobs]
    for _, _, t, opts in plans:
        t.check(model, opts)
    prompt_ids, pixels = parity_inputs(model, tokenizer, template)
    report: dict = {"prompt_ids": prompt_ids, "question": PARITY_QUESTION, "artifacts": {}}
    artifacts = []
    failed = []
    staged = StagedDir(out_dir, overwrite, exists_error=DataError)
    with staged as stage:
        for fmt, quant, t, opts in plans:
            sub = stage / fmt / quant
            sub.mkdir(parents=True)
            log(f"export {fmt} {quant} ...")
            t0 = time.perf_counter()
            files = t.export(model, tokenizer, sub, opts)
            t1 = time.perf_counter()
            rep = gate(t, model, sub, opts, prompt_ids, pixels)
            resolved = asdict(t.options(opts))
            timing = {"export_s": round(t1 - t0, 1), "gate_s": round(time.perf_counter() - t1, 1)}
            report["artifacts"][f"{fmt}/{quant}"] = {"options": resolved, **timing, **rep}
            log(f"  {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB in {timing['export_s']:.0f} s; parity "
                f"{'PASS' if rep['passed'] else 'FAIL'} ({timing['gate_s']:.0f} s): image cos {rep['image_cos']:.5f}, logits rel "
                f"{rep['logits_rel']:.2e}, top-1 {rep['top1_agreement']:.3f}, greedy identical {rep['greedy_identical']}"
                + ("" if rep["passed"] else f"  ({'; '.join(rep['failures'])})"))
            if not rep["passed"]:
                failed.append(f"{fmt}/{quant}")
            artifacts.append({"format": fmt, "quant": quant, "dir": f"{fmt}/{quant}",
                              "files": sorted(p.relative_to(stage).as_posix() for p in files),
                              "options": resolved, "parity_passed": rep["passed"]})
        write_bundle_metadata(stage, model, tokenizer, checkpoint, template)
        (stage / "parity_report.json").write_text(json.dumps(report, indent=2))
        if failed and allow_failed_parity:
            log(f"warning: parity gate failed for {', '.join(failed)}; writing the bundle anyway "
                "(--allow-failed-parity): for speed measurements, not for answers")
        elif failed:
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
            **BUNDLE_FILES,
            "artifacts": artifacts,
            "parity": {k: {key: v[key] for key in ("passed", "image_cos", "image_rel", "logits_rel", "top1_agreement",
                                                   "greedy_identical")}
                       for k, v in report["artifacts"].items()},
        })
        staged.publish()
    return manifest


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


def adb_device(serial: str | None = None, option: str = "--push") -> list[str]:
    """The adb command line for the device; one clear error (naming `option`) without adb or a device.
    `export --push` asks before exporting, not after; `bench --device adb` before the first bundle."""
    adb = shutil.which("adb")
    if adb is None:
        raise DataError(f"{option} needs adb on PATH (Android platform-tools); none was found")
    base = [adb] + (["-s", serial] if serial else [])
    state = subprocess.run(base + ["get-state"], capture_output=True, text=True)
    if state.returncode != 0 or state.stdout.strip() != "device":
        raise DataError(f"no Android device ready for adb ({(state.stderr or state.stdout).strip() or 'no device'})")
    return base


def push_bundle(bundle: Path, serial: str | None = None) -> str:
    """adb push the bundle to /data/local/tmp/alignkd/<name>; one clear error without adb or a device."""
    base = adb_device(serial)
    dest = f"{DEVICE_DIR}/{bundle.name}"
    for cmd in (["shell", "mkdir", "-p", DEVICE_DIR], ["push", str(bundle), f"{DEVICE_DIR}/"]):
        r = subprocess.run(base + cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise DataError(f"adb {' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()}")
    return dest
