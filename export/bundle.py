"""The deployable bundle: artifacts + tokenizer + preprocessing + prompt template + `manifest.json`.

Layout (paths relative to the bundle root; the manifest lists every file with sha256 and size):

    manifest.json            written last: a bundle without it is incomplete and refused
    preprocessing.json       ImageProcessingConfig (pad to square, resize, mean/std)
    template.json            the v1 chat template, the image token, stop ids
    tokenizer/tokenizer.model (+ tokenizer_config.json, special_tokens_map.json) and tokenizer/vocab.json
                             (pieces, scores, types: what the app's SentencePiece encoder reads)
    pte/<quant>/model.pte    onnx/<quant>/*.onnx + onnx_model.json    gguf/<quant>/model-*.gguf + mmproj-*.gguf
    parity_report.json       the parity gate's full report

Every reader (`read_manifest`, the emulator, the Android app) refuses a bundle whose manifest has an
unknown format version or a field of the wrong type, names a path outside the bundle, or lists a file
that is missing or whose size/sha256 differ; each refusal carries a category (`Refusal`, the same ids as
the app's `BundleRefusal`). The bundle is built in a temp dir beside the target and renamed into place.
"""

from __future__ import annotations

import enum
import hashlib
import json
from pathlib import Path, PurePosixPath

from alignkd import __version__
from alignkd.errors import DataError, shown
from alignkd.fileio import BAD_JSON, atomic_write

FORMAT = "alignkd-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEVICE_DIR = "/data/local/tmp/alignkd"
"""Where bundles are pushed on a phone (`export --push`) and where the app's benchmark mode reads them."""


class Refusal(enum.Enum):
    """Why a bundle is refused; the values are the ids of the Android app's `BundleRefusal`."""

    MISSING_MANIFEST = "missing_manifest"
    BAD_JSON = "bad_json"
    WRONG_FORMAT = "wrong_format"
    UNKNOWN_VERSION = "unknown_version"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    PATH_OUTSIDE = "path_outside"
    MISSING_FILE = "missing_file"
    SIZE_MISMATCH = "size_mismatch"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    ARTIFACT_NOT_LISTED = "artifact_not_listed"


class BundleError(DataError):
    """A refused bundle: one line naming the bundle and the field or file, and its `refusal` category."""

    def __init__(self, refusal: Refusal, message: str):
        super().__init__(message)
        self.refusal = refusal


# manifest["model"]: what every reader (emulator, bench, the app) takes from it, and the type of each
MODEL_FIELDS: tuple[str, ...] = ("hidden_size", "vocab_size", "num_image_tokens", "image_size", "bos_id", "pad_id",
                                 "max_seq_len")
ARTIFACT_FIELDS: tuple[str, ...] = ("format", "quant", "dir")
# the bundle's own files, by top-level field, and where they are when the field is absent or not a path
BUNDLE_FILES: dict[str, str] = {"preprocessing": "preprocessing.json", "template": "template.json",
                                "tokenizer": "tokenizer/tokenizer.model", "vocab": "tokenizer/vocab.json"}


def bundle_file(root: Path, manifest: dict, key: str) -> Path:
    """The file a top-level field names (inside the bundle), or its default when the field is not a string:
    what the app's `Manifest.fileOf` does, so both readers open the same bundles."""
    rel = manifest.get(key)
    return safe_relpath(root, rel if isinstance(rel, str) else BUNDLE_FILES[key])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_relpath(root: Path, rel: str) -> Path:
    """`root / rel`, refusing absolute paths, `..` and anything that resolves outside root."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or ":" in rel:
        raise BundleError(Refusal.PATH_OUTSIDE, f"bundle {root}: manifest names a path outside the bundle: {rel!r}")
    try:
        full = (root / p).resolve()
    except (OSError, RuntimeError):  # a symbolic-link loop (RuntimeError before Python 3.13)
        raise BundleError(Refusal.MISSING_FILE, f"bundle {root}: {rel} is a symbolic link loop") from None
    if not full.is_relative_to(root.resolve()):
        raise BundleError(Refusal.PATH_OUTSIDE, f"bundle {root}: manifest names a path outside the bundle: {rel!r}")
    return full


def file_entries(root: Path) -> list[dict]:
    """sha256 and size of every file under root except the manifest, sorted by path."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append({"path": p.relative_to(root).as_posix(), "sha256": sha256_file(p), "size": p.stat().st_size})
    return out


def write_manifest(root: Path, manifest: dict) -> dict:
    """Fill in format, version and the file list, and write manifest.json (temp file + rename)."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"alignkd-mobile {__version__}",
                **manifest, "files": file_entries(root)}
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_types(path: Path, m: dict) -> None:
    """Every field a reader uses has its JSON type, so no reader fails later on a malformed manifest."""
    def invalid(key: str, what: str) -> BundleError:
        return BundleError(Refusal.INVALID_FIELD, f"{path}: invalid field {key!r}: {what}")

    for entry in m["files"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and _is_int(entry.get("size"))
                and isinstance(entry.get("sha256"), str)):
            raise invalid("files", f"malformed entry {entry!r}")
    for entry in m["artifacts"]:
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ARTIFACT_FIELDS)
                and isinstance(entry.get("files"), list) and all(isinstance(f, str) for f in entry["files"])):
            raise invalid("artifacts", f"malformed entry {entry!r} (needs {', '.join(ARTIFACT_FIELDS)} as strings "
                                       "and files as a list of paths)")
        name = f"{entry['format']}/{entry['quant']}"
        if not isinstance(entry.get("parity_passed"), bool):  # "no" is truthy, and absent is no verdict
            raise invalid("artifacts", f"parity_passed of {name} must be true or false, not "
                                       f"{shown(entry['parity_passed']) if 'parity_passed' in entry else 'absent'}")
        if not isinstance(entry.get("options", {}), dict):
            raise invalid("artifacts", f"options of {name} must be an object, not {shown(entry['options'])}")
    model = m["model"]
    bad = [k for k in MODEL_FIELDS if not _is_int(model.get(k))]
    eos = model.get("eos_ids")
    if not (isinstance(eos, list) and eos and all(_is_int(i) for i in eos)):
        bad.append("eos_ids")
    if bad:
        raise invalid("model", f"{', '.join(bad)} missing or not integers")


def read_manifest(root: str | Path, verify: bool = True) -> dict:
    """Read and verify a bundle's manifest: version, field types, paths inside the bundle, sizes and checksums.

    Every refusal is a `BundleError` whose `refusal` says why."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(Refusal.MISSING_MANIFEST, f"{root} is not a complete bundle: {MANIFEST} is missing")
    try:
        m = json.loads(path.read_text())
    except BAD_JSON as e:
        raise BundleError(Refusal.BAD_JSON, f"{path} is not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise BundleError(Refusal.WRONG_FORMAT, f"{path}: not an alignkd bundle (the manifest is not a JSON object)")
    if m.get("format") != FORMAT:
        raise BundleError(Refusal.WRONG_FORMAT, f"{path}: not an alignkd bundle (format {m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION or isinstance(m.get("format_version"), bool):  # True == 1
        raise BundleError(Refusal.UNKNOWN_VERSION,
                          f"{path}: unknown format_version {m.get('format_version')!r} (this reader knows {FORMAT_VERSION})")
    for key, typ, name in (("files", list, "list"), ("artifacts", list, "list"), ("model", dict, "object")):
        if key not in m:
            raise BundleError(Refusal.MISSING_FIELD, f"{path}: missing field {key!r}")
        if not isinstance(m[key], typ):
            raise BundleError(Refusal.INVALID_FIELD, f"{path}: invalid field {key!r}: expected a {name}")
    _check_types(path, m)
    if verify:
        for entry in m["files"]:
            f = safe_relpath(root, entry["path"])
            if not f.is_file():
                raise BundleError(Refusal.MISSING_FILE, f"bundle {root}: file {entry['path']} listed in the manifest is missing")
            if f.stat().st_size != entry["size"]:
                raise BundleError(Refusal.SIZE_MISMATCH,
                                  f"bundle {root}: {entry['path']} has size {f.stat().st_size}, the manifest says {entry['size']}")
            if sha256_file(f) != entry["sha256"]:
                raise BundleError(Refusal.CHECKSUM_MISMATCH, f"bundle {root}: checksum mismatch for {entry['path']}")
        listed = {e["path"] for e in m["files"]}
        for a in m["artifacts"]:
            for rel in a["files"]:
                safe_relpath(root, rel)
                if rel not in listed:
                    raise BundleError(Refusal.ARTIFACT_NOT_LISTED,
                                      f"bundle {root}: artifact file {rel} is not in the manifest's file list")
    return m
