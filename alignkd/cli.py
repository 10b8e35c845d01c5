"""`alignkd-mobile`: train → export → check. Each command imports its workflow lazily (fast --help)."""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import stat
import sys
import threading

import click

from .errors import AlignKDError


_PATH_ERRORS = {NotADirectoryError: "a part of this path is a file, not a folder",
                FileExistsError: "exists and is not a folder", IsADirectoryError: "is a folder, not a file",
                PermissionError: "permission denied"}
_PATH_ERRNOS = {errno.ENAMETOOLONG: "a file or folder name is too long", errno.ELOOP: "a symbolic link loop"}


def _close_bars() -> None:
    """Close the progress bars a stop interrupted: a bar's last redraw ends in a carriage return, and the line
    printed next would share its terminal line (or a later redraw would hide it)."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(tqdm._instances):
            bar.close()


def _fail(message: str) -> None:
    """The one `error:` line and exit status 2."""
    _close_bars()
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _stdout_is_full() -> bool:
    """Whether standard output is what ran out of space: its buffer still cannot be written, or it is a file on
    a full file system, or /dev/full."""
    try:
        sys.stdout.flush()
        st = os.fstat(sys.stdout.fileno())
        if stat.S_ISCHR(st.st_mode):
            return (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 7)
        return stat.S_ISREG(st.st_mode) and os.fstatvfs(sys.stdout.fileno()).f_bavail == 0
    except OSError:
        return True
    except (AttributeError, ValueError):  # no file behind it
        return False


class _Stopped(BaseException):
    """SIGTERM or SIGHUP (a scheduler's or torchrun's stop, a closed terminal), raised where the main thread is,
    so that temp folders are removed and open files closed as after Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_cleanly() -> dict:
    """Install the SIGTERM / SIGHUP handlers; returns the handlers they replaced."""
    main_pid = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != main_pid:  # a forked worker (data loading) ends as the signal means
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Stopped(signum)

    replaced = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(s) == signal.SIG_DFL:  # not one a caller set up (a test runner, an embedding app)
                replaced[s] = signal.signal(s, handler)
    return replaced


def _clean_errors(fn):
    """Bad input the user can fix → one line on stderr and exit status 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AlignKDError as e:
            _fail(str(e))
        except OSError as e:
            if e.errno == 28:  # ENOSPC: writes are atomic, so nothing half-written is left marked done
                if not e.filename and _stdout_is_full():
                    _fail("standard output is on a full disk: what this command printed is lost (the files it "
                          "wrote are complete)")
                where = f" while writing {e.filename}" if e.filename else ""
                _fail(f"disk full{where}: no space left on device")
            said = _PATH_ERRORS.get(type(e)) or _PATH_ERRNOS.get(e.errno)
            if said and e.filename:  # a path the user gave that cannot be what it must be
                _fail(f"{e.filename}: {said}")
            raise

    return wrapper


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # the lone surrogates of undecodable bytes (PEP 383)
        return False


class _Group(click.Group):
    """Click's usage errors (a missing argument, an option value of the wrong type or range) as one
    `error:` line with exit status 2, like every other bad input, instead of click's four-line block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        if sys.stdout is None:  # started with `>&-`: every answer and listing would vanish, with exit status 0
            click.echo("error: standard output is closed: nothing this command prints could be read", err=True)
            sys.exit(2)
        for arg in sys.argv[1:] if args is None else args:
            if not _is_utf8(arg):  # bytes that are not UTF-8: onnxruntime and sentencepiece cannot open such paths
                raw = os.fsencode(arg)
                said = raw.decode("utf-8", "backslashreplace")
                if _is_utf8(raw.decode("utf-8", "surrogateescape")):  # UTF-8 indeed: the locale reads it otherwise
                    click.echo(f"error: argument '{said}' cannot be read in this locale (its file-name encoding is "
                               f"{sys.getfilesystemencoding()}): set LC_ALL=C.UTF-8, or PYTHONUTF8=1", err=True)
                else:
                    click.echo(f"error: argument '{said}' is not UTF-8 text: paths and prompts must be (ExecuTorch, "
                               "onnxruntime and SentencePiece open UTF-8 paths only)", err=True)
                sys.exit(2)
        replaced = _stop_cleanly()
        try:
            return self._main(args, prog_name, complete_var, **extra)
        except OSError as e:  # --help or --version into a full disk (a command's own output: _clean_errors)
            if e.errno != errno.ENOSPC:
                raise
            click.echo("error: standard output is on a full disk: what this command printed is lost", err=True)
            sys.exit(2)
        except _Stopped as e:
            _close_bars()
            click.echo(f"stopped by {signal.Signals(e.signum).name}", err=True)
            sys.exit(128 + e.signum)
        finally:
            for s, handler in replaced.items():
                signal.signal(s, handler)

    def format_commands(self, ctx, formatter) -> None:
        """The group's docstring lists the commands in workflow order, each whole; click's own list would
        repeat them alphabetically, cut short."""

    def _main(self, args, prog_name, complete_var, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `alignkd-mobile`: the help, as click prints it
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            _close_bars()
            click.echo("aborted", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="alignkd-mobile")
def main() -> None:
    """Align-KD distillation of MobileVLM V2, and export to phones.

    \b
    train          distil a teacher into a student (or train the baseline); no arguments = easy-vqa demo
    teacher-cache  run the teacher once over the data; Align-KD then trains without the 7B LM
    train-keys     every training config key with its default and meaning
    eval           score checkpoints on MobileVLM's benchmarks; distilled-vs-baseline report
    export         quantize + lower to ExecuTorch / ONNX / GGUF with a parity gate; bundle for the app
    run            answer a question about an image with a bundle (desktop emulator)
    bench          latency + accuracy of bundles side by side (host or adb)
    info           architecture summary and parameter counts of a preset or checkpoint
    """


@main.command()
@click.argument("preset_or_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the config and counts as JSON.")
@_clean_errors
def info(preset_or_dir: str, as_json: bool) -> None:
    """Architecture summary and parameter counts per part.

    PRESET_OR_DIR is a preset name (mobilevlm-v2-1.7b, mobilevlm-v2-7b, tiny-student, tiny-teacher,
    tiny-student-36, tiny-teacher-36) or a local checkpoint directory in the mtgv format.
    """
    import dataclasses

    from .errors import ConfigError
    from .model.checkpoint import config_from_name
    from .model.config import PRESETS
    from .model.summary import describe, parameter_counts

    if not preset_or_dir.strip():  # '' would read ./config.json
        raise ConfigError(f"PRESET_OR_DIR is empty: name a preset ({', '.join(PRESETS)}) or a checkpoint directory")
    config = config_from_name(preset_or_dir)
    if as_json:
        click.echo(json.dumps({"config": dataclasses.asdict(config), "parameters": parameter_counts(config)}, indent=2))
    else:
        click.echo(describe(config))


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("--demo", is_flag=True, help="Run the embedded easy-vqa demo (what `train` alone runs); OVERRIDES "
              "are then its keys (alignkd-mobile train-keys --demo).")
@click.option("--config", "config_path", help="YAML config (see configs/): a training config, or the demo's with "
              "--demo.")
@click.option("--method", type=click.Choice(["alignkd", "baseline", "logit-kd"]),
              help="What to train (default: the config's, else alignkd).")
@click.option("--teacher", help="Teacher mtgv checkpoint directory (MobileVLM_V2-7B) or preset.")
@click.option("--student", help="Student mtgv checkpoint directory (MobileVLM_V2-1.7B) or preset.")
@click.option("--data", help="LLaVA-format JSON (or 'easyvqa'): data.path.")
@click.option("--image-folder", help="Folder the JSON's image paths are relative to: data.image_folder.")
@click.option("--output-dir", help="Where the trained student, metrics, plots and checkpoints go (default: the "
              "config's output_dir, else runs/train; the demo: runs/easyvqa).")
@click.argument("overrides", nargs=-1)
@_clean_errors
def train(demo, config_path, method, teacher, student, data, image_folder, output_dir, overrides) -> None:
    """Distil a teacher into a student (Align-KD), or train the logit-KD / baseline student.

    \b
    alignkd-mobile train                  the embedded easy-vqa demo (offline, CPU, minutes): a tiny
                                          teacher, then the baseline and the Align-KD student with identical
                                          data, steps and seed; prints held-out accuracy and final loss terms,
                                          writes runs/easyvqa/summary.json
    alignkd-mobile train --demo KEY=VALUE the demo with other settings, e.g. student_steps=100
                                          methods=baseline,logit-kd,alignkd (keys: train-keys --demo)

    \b
    Anything else is one run of the training config: YAML (--config configs/...) ← options ← OVERRIDES,
    key=value pairs with groups dotted (loss.temperature=2, data.limit=1000), e.g.
      alignkd-mobile train --config configs/mobilevlm_v2_1.7b/alignkd.yaml lr=2e-5
      alignkd-mobile train --method alignkd --teacher ckpt/MobileVLM_V2-7B --student ckpt/MobileVLM_V2-1.7B \\
          --data llava_v1_5_mix665k.json --image-folder data/ steps=5000 batch_size=8 lr=2e-5
    Every key, with its meaning: alignkd-mobile train-keys. A run resumes its newest checkpoint in
    --output-dir; a checkpoint of a run with other settings is refused (resume=false starts fresh).
    Several GPUs: torchrun --nproc_per_node=8 --no-python alignkd-mobile train ... (FSDP2).
    Logit KD from an offline teacher cache (no full teacher forward per step): build it with
    `alignkd-mobile teacher-cache` and the same config, then add teacher_cache=DIR.
    """
    from .errors import ConfigError
    from .train.config import TrainConfig, config_keys, load_config

    flags = {"method": method, "teacher": teacher, "student": student, "data.path": data,
             "data.image_folder": image_folder, "output_dir": output_dir}
    given = {k: v for k, v in flags.items() if v is not None}
    if demo or not (config_path or given or overrides):
        from .demo import DemoConfig, run_demo

        if set(given) - {"output_dir"}:
            raise ConfigError("--demo takes --config, --output-dir and the demo's keys (train-keys --demo), not "
                              + ", ".join(f"--{k.split('.')[-1].replace('_', '-')}" for k in given if k != "output_dir"))
        run_demo(load_config(config_path, list(overrides), cls=DemoConfig, flags=given))
        return
    from .demo import DemoConfig
    from .train.recipe import train as run_training

    run_keys = {k for k, _, _ in config_keys(TrainConfig)}
    demo_only = sorted({o.split("=", 1)[0] for o in overrides} & ({k for k, _, _ in config_keys(DemoConfig)} - run_keys))
    if demo_only:
        demo_keys = {k for k, _, _ in config_keys(DemoConfig)}
        kept = [o for o in overrides if o.split("=", 1)[0].strip() in demo_keys]  # a run's keys would fail there
        raise ConfigError(f"{', '.join(demo_only)}: key(s) of the demo, not of a training run; "
                          f"run the demo with: alignkd-mobile train --demo {' '.join(kept)}")
    summary = run_training(load_config(config_path, list(overrides), cls=TrainConfig, flags=given))
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))


@main.command("teacher-cache")
@click.option("--config", "config_path", help="The training config (YAML) the cache is for.")
@click.option("--teacher", help="Teacher mtgv checkpoint directory (MobileVLM_V2-7B) or preset.")
@click.option("--student", help="Student mtgv checkpoint directory or preset (its tokenizer and image preprocessing).")
@click.option("--data", help="LLaVA-format JSON (or 'easyvqa'): data.path.")
@click.option("--image-folder", help="Folder the JSON's image paths are relative to: data.image_folder.")
@click.option("--output-dir", help="The cache folder (= teacher_cache; needed here or in the config).")
@click.option("--overwrite", is_flag=True, help="Replace a cache in the folder that was made for another run "
              "(another teacher, k, temperature, KD positions or template) instead of refusing it.")
@click.argument("overrides", nargs=-1)
@_clean_errors
def teacher_cache(config_path, teacher, student, data, image_folder, output_dir, overwrite, overrides) -> None:
    """Run the teacher once over a training config's samples and cache its top-k log-probs at the KD
    positions, so that `train ... teacher_cache=DIR` needs no full teacher forward.

    \b
    Same config and keys as train (train-keys); what the cache holds comes from
      loss.kd_topk (k; unset: 32, about 128 bytes per KD position; the vocabulary size: every token),
      loss.temperature, loss.kd_positions (text or tokens),
      data.* and teacher; batch_size, teacher_dtype, precision, num_workers set how it runs.
    e.g.
      alignkd-mobile teacher-cache --config configs/mobilevlm_v2_1.7b/alignkd.yaml \\
          --output-dir cache/7b-k32
      alignkd-mobile train --config configs/mobilevlm_v2_1.7b/alignkd.yaml teacher_cache=cache/7b-k32
    (train takes k from the cache unless loss.kd_topk is set, which must then be the cache's).
    Rerunning the command continues a killed build (finished shards are kept). Several GPUs:
    torchrun --nproc_per_node=8 --no-python alignkd-mobile teacher-cache ... (the ranks split the samples).
    """
    from .train.config import TrainConfig, load_config
    from .train.recipe import build_teacher_cache

    flags = {"teacher": teacher, "student": student, "data.path": data, "data.image_folder": image_folder,
             "teacher_cache": output_dir}
    cfg = load_config(config_path, list(overrides), cls=TrainConfig, flags={k: v for k, v in flags.items() if v})
    summary = build_teacher_cache(cfg, overwrite)
    if summary.get("teacher_cache"):  # rank 0 (under torchrun the other ranks print nothing)
        click.echo(f"teacher cache {summary['teacher_cache']}: {summary['samples']} samples ({summary['computed_now']} "
                   f"computed now), {summary['kd_positions']} KD positions, k = {summary['k']}, {summary['bytes']} bytes "
                   f"= {summary['bytes_per_kd_position']} bytes per KD position"
                   + (f"; {summary['samples_per_s']} samples/s" if summary["samples_per_s"] is not None else ""),
                   err=True)
        click.echo(json.dumps(summary, indent=2))


@main.command("eval")
@click.argument("checkpoints", nargs=-1)
@click.option("--bench", "benches", default="easyvqa", show_default=True,
              help="Comma-separated: easyvqa, gqa, sqa, textvqa, pope, mme, mmbench.")
@click.option("--data-root", help="The benchmark's folder, or the folder holding one per benchmark (e.g. LLaVA-1.5's "
              "playground/data/eval, MobileVLM's data/benchmark_data); files below.")
@click.option("--answers", "answer_files", multiple=True, metavar="FILE",
              help="Score this LLaVA / MobileVLM answer file (JSON lines) instead of checkpoints; no model is "
              "loaded. Repeatable (one run each, named by the file name); one --bench.")
@click.option("--output-dir", default="runs/eval", show_default=True, help="Answers (JSON lines) and the report.")
@click.option("--limit", type=int, help="Score only N questions of each benchmark: the first N (easy-vqa: a "
              "seeded random N, as the demo scores). For smoke runs.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Questions decoded together.")
@click.option("--max-new-tokens", type=int, default=16, show_default=True,
              help="Longest answer, in tokens (a resumed eval must keep it).")
@click.option("--distilled", help="The distilled run, compared against --baseline: its name (the checkpoint folder's "
              "name, e.g. alignkd, or the answer file's without .jsonl) or its checkpoint path.")
@click.option("--baseline", help="The undistilled run, named as --distilled.")
@click.option("--device", default="auto", show_default=True,
              help="Where the checkpoints answer: auto (a GPU when there is one), cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Weights' precision: auto is bf16 on a GPU, fp32 on the CPU (a resumed eval must keep it).")
@click.option("--artifact", metavar="FORMAT/QUANT", help="For bundles: which artifact answers (e.g. pte/8da4w, "
              "onnx/fp32); default: each bundle's first, the one the app runs.")
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True,
              help="For bundles: runtime threads, 1 to 256.")
@_clean_errors
def eval_cmd(checkpoints, benches, data_root, answer_files, output_dir, limit, batch_size, max_new_tokens, distilled,
             baseline, device, dtype, artifact, threads) -> None:
    """Score CHECKPOINTS (mtgv directories, or bundles from `export`) on MobileVLM's benchmarks, as the
    official scripts score them.

    A bundle answers through the emulator, as the phone runs it (its preprocessing, template, tokenizer and
    quantized artifact, one question at a time): what ships is scored beside the checkpoint it came from; its
    run is named with the artifact (alignkd-pte-8da4w). Checkpoints: greedy decoding, batched, with a KV cache. Answers go to OUTPUT_DIR/answers/<ckpt>/<bench>.jsonl in
    LLaVA's format ({"question_id", "prompt", "text", ...} per line, official question ids) as they come:
    rerunning the same command resumes a killed eval, and the official scripts read the file. The
    report (report_radar.png, report.json, report.md) has one row per run, the paper's average (MME
    divided by 20), the distilled − baseline difference, the official rule behind each number, and per
    run the questions without an answer (scored wrong) and answers to unknown question ids.

    \b
    Files under --data-root (each benchmark also looks in its subfolder: gqa, scienceqa or sqa,
    textvqa, pope, MME or mme, mmbench):
      gqa      testdev_balanced_questions.json + images/            (release; MobileVLM)
               data/testdev_balanced_questions.json + data/images/  (LLaVA-1.5)
      sqa      problems.json + pid_splits.json + images/test/<pid>/image.png
      textvqa  TextVQA_0.5.1_val.json + train_images/; OCR tokens from
               llava_textvqa_val_v051_ocr.jsonl or TextVQA_Rosetta_OCR_v0.2_val.json
      pope     coco_pope_{adversarial,random,popular}.json + val2014/        (release)
               coco/coco_pope_{adversarial,random,popular}.json + val2014/   (LLaVA-1.5; MobileVLM)
      mme      MME_Benchmark_release_version/<subtask>/: NAME.jpg|png + NAME.txt, or images/ +
               questions_answers_YN/ (LLaVA-1.5: inside MME/; MobileVLM: as mme/images)
      mmbench  mmbench_dev_en_20231003.tsv, mmbench_dev_20230712.tsv, MMBench_DEV_EN.tsv or
               MMBench_DEV_EN_V11.tsv
      easyvqa  none (shipped in the easy-vqa package)
    """
    from .eval.evaluate import evaluate
    from .fileio import check_output_dir

    def open_bundle(path: str):
        from .bundle_answers import BundleAnswerer  # the export stack loads only for a bundle

        return BundleAnswerer(path, artifact, threads)

    check_output_dir(output_dir)
    evaluate(list(checkpoints), [b.strip() for b in benches.split(",") if b.strip()], data_root, output_dir, limit,
             batch_size, max_new_tokens, distilled, baseline, log=click.echo, answers=list(answer_files),
             device=device, dtype=dtype, open_bundle=open_bundle)


def _key_value(ctx, param, values) -> dict:
    """--opt KEY=VALUE (repeated) → {KEY: VALUE}."""
    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {v!r}", ctx, param)
        if key.strip() in out:  # the last would win silently
            raise click.BadParameter(f"{key.strip()} is given twice", ctx, param)
        out[key.strip()] = value.strip()
    return out


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--target", type=click.Choice(["android", "desktop"]), default="android", show_default=True,
              help="android: a bundle for the demo app (needs pte); desktop: any formats.")
@click.option("--format", "formats", default=None, help="Comma-separated: pte, onnx, gguf (default: pte for "
              "android, all three for desktop).")
@click.option("--quant", "quants", default=None, help="Comma-separated quantizations of the LM; each applies to the "
              "formats that support it (pte: fp32, 8da4w, 8da8w, int8; onnx: fp32, fp16, int8, int4; gguf: fp32, fp16, "
              "q8_0, q4_0, q4_k_m). Default per format: 8da4w, int4, q4_0.")
@click.option("--output-dir", required=True, type=click.Path(), help="The bundle directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=512, show_default=True,
              help="Static KV cache / context length (at most the model's context).")
@click.option("--group-size", type=click.IntRange(min=1), default=None, help="= --opt group_size: the group of "
              "4-bit weights (pte, onnx). Default per format, the fastest at the gated accuracy: pte 32, onnx 64 "
              "(gguf's Q4_0 block is always 32).")
@click.option("--vision-quant", default=None, help="= --opt vision_quant: the vision encoder's quantization, "
              "gated on the image tokens against the fp32 encoder. pte: fp32, 8da8w, 8da4w; onnx: fp32, fp16, int8, "
              "int4; gguf: fp32 (f32), fp16 (f16), q8_0. Default (auto): fp32 / fp16 beside an fp32 / fp16 LM, else "
              "8-bit (pte 8da8w, gguf q8_0; onnx: the LM's quant).")
@click.option("--embedding-quant", type=click.Choice(["auto", "fp32", "8", "4"]), default=None,
              help="= --opt embedding_quant (pte): the token-embedding table. Default (auto): the LM's weight bits "
              "(8da4w: 4; 8da8w, int8: 8; fp32: fp32).")
@click.option("--opt", "opts", multiple=True, callback=_key_value, metavar="KEY=VALUE",
              help="A target's own option, KEY for every format that has it or FORMAT.KEY for one (repeatable). "
              "pte: group_size (32), embedding_quant (auto, fp32, 8, 4), vision_quant (auto, fp32, 8da8w, 8da4w). "
              "onnx: group_size (64; 16-256, a power of 2), accuracy_level (4; 0-4, MatMulNBits compute type), "
              "int4_symmetric (true), vision_quant (auto, fp32, fp16, int8, int4), share_buffer (true; runtime KV "
              "buffer), embedding_fp16 (true; int8/int4 table in fp16). gguf: vision_quant (auto, fp32, fp16, q8_0).")
@click.option("--allow-failed-parity", is_flag=True, help="Write the bundle even when an artifact fails its "
              "parity gate (speed runs on random weights); the manifest records the failure and run / bench warn.")
@click.option("--push", is_flag=True, help="adb push the bundle to /data/local/tmp/alignkd/ (android).")
@click.option("--serial", help="adb device serial for --push.")
@_clean_errors
def export(checkpoint, target, formats, quants, output_dir, overwrite, max_seq_len, group_size, vision_quant,
           embedding_quant, opts, allow_failed_parity, push, serial) -> None:
    """Quantize and lower a student CHECKPOINT (mtgv directory) to ExecuTorch / ONNX / GGUF, check every
    artifact against the eager model (parity gate), and write a verified bundle with manifest.json.

    A failed parity check exits non-zero and leaves OUTPUT_DIR.failed without a manifest (unless
    --allow-failed-parity).
    """
    from pathlib import Path

    from .errors import ConfigError
    from .export.exporter import adb_device, export_bundle, push_bundle

    if push:
        adb_device(serial)  # no adb or no device: said before the export, not after it
    fmts = [f.strip() for f in (formats or ("pte" if target == "android" else "pte,onnx,gguf")).split(",") if f.strip()]
    qs = [q.strip() for q in quants.split(",") if q.strip()] if quants is not None else None
    if qs == []:
        raise ConfigError(f"--quant {quants!r} names no quantization")
    named = {"group_size": group_size, "vision_quant": vision_quant, "embedding_quant": embedding_quant}
    options = {**{k: v for k, v in named.items() if v is not None}, **opts}
    manifest = export_bundle(checkpoint, output_dir, fmts, qs, target, overwrite, max_seq_len, options=options,
                             allow_failed_parity=allow_failed_parity, log=click.echo)
    total = sum(f["size"] for f in manifest["files"])
    verdict = {True: [], False: []}
    for name, p in manifest["parity"].items():
        verdict[p["passed"]].append(name)
    click.echo(f"bundle {output_dir}: {len(manifest['files'])} files, {total / 2**20:.1f} MiB, parity passed for "
               + (", ".join(verdict[True]) or "none") + (f"; FAILED for {', '.join(verdict[False])}" if verdict[False] else ""))
    if push:
        click.echo(f"pushed to {push_bundle(Path(output_dir), serial)}")


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--image", required=True, type=click.Path(), help="Image file (any size: the bundle's preprocessing "
              "pads, resizes and crops it).")
@click.option("--prompt", "prompts", required=True, multiple=True, help="The question; repeat it for follow-up "
              "questions about the same image (their image tokens come from the image-token cache).")
@click.option("--format", "fmt", help="Artifact format in the bundle (default: the first).")
@click.option("--quant", help="Artifact quantization in the bundle (default: the first of that format).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="At least 1.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="In (0, 1].")
@click.option("--threads", type=int, default=2, show_default=True, help="Runtime threads (1 to 256).")
@click.option("--short-answer", is_flag=True, help="Add the short-answer instruction (\"Answer the question using "
              "a single word or phrase.\") on a new line, as eval asks and the easy-vqa demo trains.")
@_clean_errors
def run(bundle, image, prompts, fmt, quant, max_new_tokens, temperature, top_p, threads, short_answer) -> None:
    """Answer PROMPT about IMAGE with an exported BUNDLE, through the desktop emulator (as the app does).
    Answers go to stdout, one per prompt; timings to stderr."""
    from .data.image import load_image
    from .data.templates import short_answer as instruct
    from .export.base import check_threads
    from .export.emulator import BundleRunner
    from .export.runtime import check_decoding

    check_decoding(max_new_tokens, temperature, top_p)  # before the bundle loads
    check_threads(threads)
    if any(not p.strip() for p in prompts):  # the model would answer a question nobody asked
        raise click.BadParameter("a prompt is empty: ask a question about the image", param_hint="'--prompt'")
    image = load_image(image)  # a missing or broken image too
    prompts = [instruct(p) for p in prompts] if short_answer else list(prompts)
    runner = BundleRunner(bundle, fmt, quant, threads)
    if not runner.parity_passed:
        click.echo(f"warning: {runner.name} failed its parity gate at export (--allow-failed-parity)", err=True)
    try:
        for prompt in prompts:
            ans = runner.answer(image, prompt, max_new_tokens, temperature, top_p)
            g = ans.generation
            click.echo(ans.text)
            source = "cached" if g.timings.get("image_cached") else f"{g.timings['image_s']:.3f}s"
            click.echo(f"[{runner.name}] load {runner.load_s:.2f}s, image {source}, prefill {g.prompt_len} positions "
                       f"{g.timings['prefill_s']:.3f}s, {len(ans.tokens)} tokens", err=True)
    finally:
        runner.close()


@main.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path())
@click.option("--device", default="host", show_default=True, help="host, or adb[:SERIAL] for a phone.")
@click.option("--n-runs", type=int, default=3, show_default=True, help="Measured runs per artifact (at least 1).")
@click.option("--threads", type=int, default=2, show_default=True,
              help="Runtime threads on the host, 1 to 256 (the app uses ExecuTorch's default).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True,
              help="Tokens decoded per run, EOS ignored (as llama-bench), so every run times as many decode steps.")
@click.option("--accuracy-limit", type=int, default=100, show_default=True,
              help="easy-vqa held-out questions scored per artifact through the emulator (0 = skip; host).")
@click.option("--output-dir", default="runs/bench", show_default=True, help="Where bench.png, bench.json and "
              "bench.md go.")
@_clean_errors
def bench(bundles, device, n_runs, threads, max_new_tokens, accuracy_limit, output_dir) -> None:
    """Latency and accuracy of BUNDLES side by side (e.g. the distilled and the baseline student):
    load time, image encode, time to first token with the image encoded (cold) and with its tokens cached
    (warm: a follow-up question about the same image), prefill and decode tokens/s, peak RSS, easy-vqa
    accuracy. Writes bench.png, bench.json and bench.md."""
    from .bench import SomeFailed, bench_adb, bench_host, check_options, render_table, write_outputs
    from .errors import ConfigError
    from .fileio import check_output_dir

    check_options(n_runs, threads, max_new_tokens, accuracy_limit)
    check_output_dir(output_dir)  # before the runs, not after them
    if device == "host":
        measure = functools.partial(bench_host, list(bundles), n_runs, threads, max_new_tokens, accuracy_limit)
    elif device == "adb" or device.startswith("adb:"):
        measure = functools.partial(bench_adb, list(bundles), device.partition(":")[2] or None, n_runs, max_new_tokens)
    else:
        raise ConfigError(f"--device must be host or adb[:SERIAL], got {device!r}")
    try:
        rows = measure(log=click.echo)
    except SomeFailed as e:
        if e.rows:
            click.echo(render_table(e.rows))
            click.echo("wrote " + ", ".join(str(p) for p in write_outputs(e.rows, output_dir).values()))
        raise
    click.echo(render_table(rows))
    paths = write_outputs(rows, output_dir)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@main.command("train-keys")
@click.option("--demo", is_flag=True, help="The demo's keys (train --demo) instead of the training config's.")
@_clean_errors
def train_keys(demo: bool) -> None:
    """List every training config key (groups dotted: data.KEY, loss.KEY) with its default and meaning."""
    import textwrap

    from .train.config import TrainConfig, config_keys

    cls = TrainConfig
    if demo:
        from .demo import DemoConfig as cls
    for key, default, doc in config_keys(cls):
        click.echo(f"{key} = {default!r}\n{textwrap.indent(doc, '    ')}")


if __name__ == "__main__":
    main()
