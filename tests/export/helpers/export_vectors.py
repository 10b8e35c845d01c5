"""Shared test vectors: what the Python side computes, written as files that the Android app's JVM module
(android_demo/core) is tested against, so that the phone preprocesses, tokenizes, verifies bundles and
decodes exactly as the Python emulator does.

    .venv/bin/python tests/export/helpers/export_vectors.py OUT_DIR
                                                  # the committed copy: android_demo/core/src/test/resources/vectors

Everything is deterministic; tests/export/test_vectors.py regenerates the vectors into a temp dir and
requires them to equal the committed files byte for byte, so they cannot go stale.

Layout of OUT_DIR:
    images/*.png, *.jpg     small generated images (non-square, grayscale, RGBA, palette, JPEG) and one
                            easy-vqa image; photo.decoded.png is the JPEG as PIL decodes it (lossless)
    images.json             per image and preprocessing config: the uint8 crop after pad/resize/crop
                            (HWC, as ints for small configs, sha256 always), per-channel mean/std of the
                            normalised (3, S, S) float32 tensor, and the full tensor for a few images
    tokenizer.json          raw texts -> SentencePiece ids; v1 prompts -> ids from tokenize_prompt
    bundles/base/           a valid bundle (dummy artifact, real manifest/tokenizer/template/preprocessing)
    bundles.json            variants: file operations applied to a copy of bundles/base, and the verdict
                            of export.bundle.read_manifest ("ok" or the refusal's category)
    decode.json             a fake deterministic runtime (integer arithmetic, fake_runtime.py) and what
                            export.runtime.generate does over it: tokens, prompt length, every call
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from alignkd.data import easyvqa
from alignkd.data.image import ImageProcessingConfig, load_image, preprocess
from alignkd.data.templates import build_prompt
from alignkd.data.tokenize import tokenize_prompt
from alignkd.errors import DataError
from alignkd.export.bundle import MANIFEST, BundleError, read_manifest, write_manifest
from alignkd.model.config import IMAGE_TOKEN_INDEX
from fake_runtime import FakeRuntime

# ---------------------------------------------------------------------------------------------- images

CONFIGS: dict[str, ImageProcessingConfig] = {
    "tiny48": ImageProcessingConfig(image_size=48),  # the tiny presets' pixels (CLIP mean/std, pad)
    "tiny96": ImageProcessingConfig(image_size=96),
    "crop48": ImageProcessingConfig(image_size=48, pad_to_square=False),  # resize + centre crop
    "half32": ImageProcessingConfig(image_size=32, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
    "bilinear48": ImageProcessingConfig(image_size=48, resample="bilinear"),
    "lanczos48": ImageProcessingConfig(image_size=48, resample="lanczos"),
}
# configs whose uint8 crops are written out in full (the others only by sha256)
U8_CONFIGS = ("tiny48",)
# images whose normalised tiny48 tensor is written out in full (the others by stats)
FULL_FLOATS = ("wide_rgb.png", "easyvqa_0.png")


def _pattern(w: int, h: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8: gradients, a checkerboard and noise, so every resampling tap matters."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1))
    g = (y * 255 // max(h - 1, 1))
    b = np.where(((x // 5) + (y // 5)) % 2 == 0, 230, 20)
    img = np.stack([r, g, b], -1).astype(np.int64) + rng.randint(-25, 26, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_images(d: Path) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pattern(150, 90, 1)).save(d / "wide_rgb.png")  # downscale (antialiased) after padding
    Image.fromarray(_pattern(23, 37, 2)).save(d / "tall_small.png")  # upscale
    gray = _pattern(61, 40, 3).mean(-1).astype(np.uint8)
    Image.fromarray(gray, mode="L").save(d / "gray.png")
    rgba = np.concatenate([_pattern(50, 50, 4), (np.arange(50 * 50).reshape(50, 50, 1) % 256).astype(np.uint8)], -1)
    Image.fromarray(rgba, mode="RGBA").save(d / "rgba.png")  # alpha is dropped, as PIL's convert("RGB") does
    Image.fromarray(_pattern(40, 30, 5)).quantize(colors=16, method=Image.Quantize.MEDIANCUT).save(d / "palette.png")
    Image.fromarray(_pattern(120, 80, 6)).save(d / "photo.jpg", quality=90)  # 4:2:0, baseline
    Image.fromarray(np.asarray(load_image(d / "photo.jpg"))).save(d / "photo.decoded.png")
    shutil.copyfile(easyvqa.first_test_image(), d / "easyvqa_0.png")
    return ["wide_rgb.png", "tall_small.png", "gray.png", "rgba.png", "palette.png", "photo.jpg",
            "photo.decoded.png", "easyvqa_0.png"]


def _u8_crop(img: Image.Image, cfg: ImageProcessingConfig) -> np.ndarray:
    """The uint8 (S, S, 3) image that `preprocess` normalises (its steps 1-3)."""
    x = preprocess(img, cfg).numpy().transpose(1, 2, 0)  # (S, S, 3) float32
    mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
    u8 = np.rint((x * std + mean) * 255).astype(np.int64)
    # check the inversion: re-normalising these bytes must give preprocess's floats exactly
    again = ((u8.astype(np.float64) * (1 / 255)).astype(np.float32) - mean) / std
    assert np.array_equal(again, x), "uint8 inversion of preprocess failed"
    return u8.astype(np.uint8)


def _f32(v: float) -> float:
    """A float32 value as the shortest decimal that reads back to the same float32."""
    return float(str(np.float32(v)))


def image_vectors(img_dir: Path, names: list[str]) -> dict:
    out: dict = {"configs": {k: c.to_dict() for k, c in CONFIGS.items()}, "images": []}
    for name in names:
        img = load_image(img_dir / name)
        src = Image.open(img_dir / name)
        entry: dict = {"file": name, "mode": src.mode, "width": img.width, "height": img.height,
                       "rgb_sha256": hashlib.sha256(np.asarray(img, np.uint8).tobytes()).hexdigest(), "results": {}}
        for key, cfg in CONFIGS.items():
            x = preprocess(img, cfg).numpy()  # (3, S, S) float32
            u8 = _u8_crop(img, cfg)
            r: dict = {
                "u8_sha256": hashlib.sha256(u8.tobytes()).hexdigest(),
                "mean": [float(x[c].astype(np.float64).mean()) for c in range(3)],
                "std": [float(x[c].astype(np.float64).std()) for c in range(3)],
            }
            if key in U8_CONFIGS:
                r["u8_hwc"] = u8.reshape(-1).tolist()
            if key == "tiny48" and name in FULL_FLOATS:
                r["pixels_chw"] = [_f32(v) for v in x.reshape(-1)]
            entry["results"][key] = r
        out["images"].append(entry)
    return out


# ------------------------------------------------------------------------------------------- tokenizer

TEXTS = [
    "Hello world", " leading space", "  two leading", "a  b   c ", "\n", "\nWhat is it? ASSISTANT:", "USER: ",
    "12345 67.8", "héllo wörld 你好 🙂", "\ttab\t", "▁x ▁", "", " ", "What shape is in the image?",
    "Is there a blue circle?", "The quick brown fox jumps over the lazy dog.", "</s> <s> <unk> <0x41>",
    "3.14159 2024-06-01 100%", "Ünïcödé ñ ß Ω ж ☃ 𝔘", "line one\nline two\r\nline three", "ASSISTANT:ASSISTANT:",
    "zzzzqqqq xylophone", "a" * 40, "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000",
]
QUESTIONS = [
    "What shape is in the image?", "What color is the shape?", "Is there a red triangle?",
    "How many shapes are there? Answer with 1 digit.", "Describe the picture.\nThen count: 1, 2, 3.",
    "¿Qué forma es? 形状は何ですか 🙂", "  spaced   out  ", "",
]


def random_texts(n: int = 60, seed: int = 0) -> list[str]:
    """Deterministic strings mixing corpus words, runs of spaces, digits, punctuation and non-ASCII."""
    rng = np.random.RandomState(seed)
    atoms = ["shape", "circle", " ", "  ", "\n", "\t", "What", "is", "the", "colour", "ASSISTANT:", "USER:", "0", "7",
             "42", "3.5", "?", ",", "!", "é", "ß", "你好", "🙂", "ж", "▁", "<image>", "</s>", "x", "qz", "teacher",
             "model", "-", "'", "\"", "aligned", "Ω"]
    out = []
    for _ in range(n):
        k = int(rng.randint(1, 12))
        out.append("".join(atoms[int(i)] for i in rng.randint(0, len(atoms), size=k)))
    return out


def DECODE_IDS(sp) -> list[list[int]]:
    """Id sequences for decoding: BOS/EOS/UNK, a leading space, bytes of one character split by text."""
    hello = sp.encode("Hello world")
    return [[1] + hello, hello + [2], [0], [1, 2], [0] + hello, sp.encode(" x"), [1] + sp.encode("  two"),
            sp.encode("你") + hello, hello[:1] + [1] + hello[1:], sp.encode("🙂")[:2]]


def tokenizer_vectors() -> dict:
    import sentencepiece as spm

    from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir

    d = tiny_tokenizer_dir()
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    tok = load_tokenizer(d)
    prompts = []
    for q in QUESTIONS:
        p = build_prompt("v1", q)
        prompts.append({"question": q, "prompt": p, "ids": tokenize_prompt(p, tok)})
    p = build_prompt("v1", QUESTIONS[0], with_image=False)
    prompts.append({"question": QUESTIONS[0], "with_image": False, "prompt": p, "ids": tokenize_prompt(p, tok)})
    return {
        "vocab": "bundles/base/tokenizer/vocab.json",
        "template": "v1",
        "image_token_index": IMAGE_TOKEN_INDEX,
        "texts": [{"text": t, "ids": sp.encode(t), "decoded": sp.decode(sp.encode(t))} for t in TEXTS + random_texts()],
        "prompts": prompts,
        "decodes": [{"ids": ids, "text": sp.decode(ids)} for ids in DECODE_IDS(sp)],
    }


# --------------------------------------------------------------------------------------------- bundles

def verdict(root: str | Path) -> str:
    """"ok", or the category of the refusal that export.bundle.read_manifest raises."""
    try:
        read_manifest(root)
    except BundleError as e:
        return e.refusal.value
    return "ok"


DUMMY_PTE = b"ALIGNKD TEST VECTOR: not an ExecuTorch program\n"


def _write_base_bundle(root: Path) -> dict:
    """A small valid bundle, written by the exporter's own writers (the artifact is a dummy file)."""
    from alignkd.model.config import get_preset
    from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir

    from alignkd.export.exporter import write_bundle_metadata

    config = get_preset("tiny-student")
    tok = load_tokenizer(tiny_tokenizer_dir())
    root.mkdir(parents=True)
    (root / "pte" / "fp32").mkdir(parents=True)
    (root / "pte" / "fp32" / "model.pte").write_bytes(DUMMY_PTE)
    write_bundle_metadata(root, SimpleNamespace(config=config), tok, tiny_tokenizer_dir(), "v1")
    (root / "parity_report.json").write_text(json.dumps({"note": "test vector"}, indent=2))
    c = config
    return write_manifest(root, {
        "target": "android",
        "model": {"preset": c.name, "checkpoint": "tiny-student", "hidden_size": c.text.hidden_size,
                  "vocab_size": c.text.vocab_size, "num_image_tokens": c.num_image_tokens,
                  "image_size": c.vision.image_size, "bos_id": c.text.bos_token_id,
                  "eos_ids": [c.text.eos_token_id], "pad_id": c.text.pad_token_id, "max_seq_len": 512},
        "preprocessing": "preprocessing.json",
        "template": "template.json",
        "tokenizer": "tokenizer/tokenizer.model",
        "vocab": "tokenizer/vocab.json",
        "artifacts": [{"format": "pte", "quant": "fp32", "dir": "pte/fp32", "files": ["pte/fp32/model.pte"],
                       "parity_passed": True}],
    })


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _variants(m: dict) -> list[tuple[str, list[dict]]]:
    """(name, ops) for each variant; ops are {"op": "delete"|"write", "path", "base64"} on a copy of base."""

    def manifest(**changes) -> dict:
        new = json.loads(json.dumps(m))
        for k, v in changes.items():
            if v is None:
                new.pop(k, None)
            else:
                new[k] = v
        return {"op": "write", "path": MANIFEST, "base64": _b64(json.dumps(new, indent=2).encode())}

    def with_path(i: int, path: str) -> dict:
        files = json.loads(json.dumps(m["files"]))
        files[i]["path"] = path
        return manifest(files=files)

    def pte_entry() -> int:
        return [e["path"] for e in m["files"]].index("pte/fp32/model.pte")

    text = json.dumps(m, indent=2).encode()
    flipped = bytearray(DUMMY_PTE)
    flipped[0] ^= 0x20
    arts_unlisted = json.loads(json.dumps(m["artifacts"]))
    arts_unlisted[0]["files"].append("pte/fp32/extra.bin")
    arts_outside = json.loads(json.dumps(m["artifacts"]))
    arts_outside[0]["files"] = ["../model.pte"]
    dot_files = json.loads(json.dumps(m["files"]))
    dot_files[[e["path"] for e in m["files"]].index("template.json")]["path"] = "./template.json"
    return [
        ("ok", []),
        ("extra_file_on_disk", [{"op": "write", "path": "notes.txt", "base64": _b64(b"not listed, not refused\n")}]),
        ("format_version_float", [manifest(format_version=1.0)]),
        ("dot_segment_path", [manifest(files=dot_files)]),
        ("missing_manifest", [{"op": "delete", "path": MANIFEST}]),
        ("truncated_json", [{"op": "write", "path": MANIFEST, "base64": _b64(text[: len(text) // 2])}]),
        ("trailing_comma", [{"op": "write", "path": MANIFEST, "base64": _b64(text[:-2] + b",\n}")}]),
        ("invalid_utf8", [{"op": "write", "path": MANIFEST, "base64": _b64(b'{"format": "\xff"}')}]),
        ("utf8_bom", [{"op": "write", "path": MANIFEST, "base64": _b64(b"\xef\xbb\xbf" + text)}]),
        ("wrong_format", [manifest(format="something-else")]),
        ("no_format", [manifest(format=None)]),
        ("unknown_version", [manifest(format_version=2)]),
        ("version_as_string", [manifest(format_version="1")]),
        ("missing_files_field", [manifest(files=None)]),
        ("missing_artifacts_field", [manifest(artifacts=None)]),
        ("missing_model_field", [manifest(model=None)]),
        ("files_not_a_list", [manifest(files={"path": "pte/fp32/model.pte"})]),
        ("model_not_an_object", [manifest(model=[1, 2])]),
        ("file_entry_without_sha256", [manifest(files=[{k: v for k, v in e.items() if k != "sha256"} if i == 0 else e
                                                       for i, e in enumerate(m["files"])])]),
        ("file_size_as_string", [manifest(files=[dict(e, size=str(e["size"])) if i == 0 else e
                                                 for i, e in enumerate(m["files"])])]),
        ("absolute_path", [with_path(0, "/etc/passwd")]),
        ("dotdot_path", [with_path(0, "tokenizer/../../outside.json")]),
        ("backslash_path", [with_path(0, "tokenizer\\vocab.json")]),
        ("colon_path", [with_path(0, "C:model.pte")]),
        ("empty_path", [with_path(0, "")]),
        ("missing_file", [{"op": "delete", "path": "pte/fp32/model.pte"}]),
        ("size_mismatch", [{"op": "write", "path": "pte/fp32/model.pte", "base64": _b64(DUMMY_PTE + b"!")}]),
        ("checksum_mismatch", [{"op": "write", "path": "pte/fp32/model.pte", "base64": _b64(bytes(flipped))}]),
        ("listed_size_wrong", [manifest(files=[dict(e, size=e["size"] + 1) if i == pte_entry() else e
                                               for i, e in enumerate(m["files"])])]),
        ("artifact_not_listed", [{"op": "write", "path": "pte/fp32/extra.bin", "base64": _b64(b"x")},
                                 manifest(artifacts=arts_unlisted)]),
        ("artifact_path_outside", [manifest(artifacts=arts_outside)]),
        ("artifacts_of_strings", [manifest(artifacts=["pte/fp32/model.pte"])]),
        ("artifacts_of_empty_objects", [manifest(artifacts=[{}])]),
        ("model_empty_object", [manifest(model={})]),
        ("max_seq_len_as_string", [manifest(model=dict(m["model"], max_seq_len="512"))]),
        ("format_version_true", [manifest(format_version=True)]),  # True == 1 in Python
        ("parity_passed_as_string", [manifest(artifacts=[dict(m["artifacts"][0], parity_passed="no")])]),
        ("parity_passed_missing", [manifest(artifacts=[{k: v for k, v in m["artifacts"][0].items()
                                                        if k != "parity_passed"}])]),
        ("options_as_string", [manifest(artifacts=[dict(m["artifacts"][0], options="x")])]),
    ]


def apply_ops(root: Path, ops: list[dict]) -> None:
    for op in ops:
        p = root / op["path"]
        if op["op"] == "delete":
            p.unlink()
        elif op["op"] == "write":
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(base64.b64decode(op["base64"]))
        else:
            raise ValueError(f"unknown op {op['op']!r}")


def bundle_vectors(bundles_dir: Path) -> dict:
    base = bundles_dir / "base"
    m = _write_base_bundle(base)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ops in _variants(m):
            root = Path(tmp) / name
            shutil.copytree(base, root)
            apply_ops(root, ops)
            out.append({"name": name, "ops": ops, "verdict": verdict(root)})
    return {"base": "bundles/base", "variants": out}


# ---------------------------------------------------------------------------------------------- decode


def decode_vectors(tok_vectors: dict, img_dir: Path) -> dict:
    from alignkd.export.runtime import generate, prompt_positions

    vocab, n_img, eos = 512, 8, 2
    img = {"file": "easyvqa_0.png", "config": "tiny48"}
    pixels = preprocess(load_image(img_dir / img["file"]), CONFIGS[img["config"]])[None].numpy()
    with_img = tok_vectors["prompts"][0]["ids"]
    text_only = next(p["ids"] for p in tok_vectors["prompts"] if p.get("with_image") is False)
    cases = [
        ("image_until_eos", with_img, True, 20, prompt_positions(with_img, n_img) + 6, None),
        ("image_until_max_new_tokens", with_img, True, 12, None, None),
        ("text_only", text_only, False, 7, None, None),
        ("eos_first", with_img, True, 5, 0, None),
        ("one_token", with_img, True, 1, None, None),
        ("exceeds_max_seq_len", with_img, True, 16, None, prompt_positions(with_img, n_img) + 15),
        ("fits_max_seq_len", with_img, True, 16, None, prompt_positions(with_img, n_img) + 16),
    ]
    out = []
    for name, ids, use_img, max_new, eos_after, max_seq_len in cases:
        rt = FakeRuntime(vocab, n_img, eos, eos_after)
        case = {"name": name, "prompt_ids": ids, "image": img if use_img else None, "max_new_tokens": max_new,
                "eos_after": eos_after, "max_seq_len": max_seq_len}
        overflows = max_seq_len is not None and prompt_positions(ids, n_img) + max_new > max_seq_len
        try:
            g = generate(rt, ids, pixels if use_img else None, max_new, eos_id=eos, max_seq_len=max_seq_len,
                         num_image_tokens=n_img)
        except DataError:
            if not overflows:
                raise
            case.update(error="exceeds_max_seq_len", calls=rt.calls)
        else:
            case.update(tokens=g.tokens, prompt_len=g.prompt_len, calls=rt.calls,
                        first_logits_argmax=int(np.argmax(g.prompt_logits)))
        out.append(case)
    return {"vocab_size": vocab, "num_image_tokens": n_img, "hidden_size": FakeRuntime.hidden, "eos_id": eos,
            "positive_pixels": int(np.count_nonzero(pixels > 0)), "cases": out}


# ----------------------------------------------------------------------------------------------- main


def _dump(path: Path, obj: dict) -> None:
    """JSON with one top-level key per line and one record per line (compact, still diffable)."""
    lines = []
    for k, v in obj.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            inner = ",\n".join("  " + json.dumps(x, ensure_ascii=False) for x in v)
            lines.append(f" {json.dumps(k)}: [\n{inner}\n ]")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}")
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


def write_vectors(out_dir: str | Path) -> Path:
    """Write every vector into out_dir (created; must not exist or be empty)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty: remove it first (the vectors are regenerated as a whole)")
    out.mkdir(parents=True, exist_ok=True)
    names = _write_images(out / "images")
    _dump(out / "images.json", image_vectors(out / "images", names))
    tv = tokenizer_vectors()
    _dump(out / "tokenizer.json", tv)
    _dump(out / "bundles.json", bundle_vectors(out / "bundles"))
    _dump(out / "decode.json", decode_vectors(tv, out / "images"))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tests/export/helpers/export_vectors.py OUT_DIR", file=sys.stderr)
        return 2
    out = write_vectors(argv[0])
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote test vectors to {out} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
