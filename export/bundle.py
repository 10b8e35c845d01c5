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
unknown format version, names a path outside the bundle, or lists a file that is missing or whose
size/sha256 differ. The bundle is built in a temp dir beside the target and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

from alignkd import __version__
from alignkd.errors import DataError
from alignkd.fileio import atomic_write

FORMAT = "alignkd-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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
        raise DataError(f"bundle {root}: manifest names a path outside the bundle: {rel!r}")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise DataError(f"bundle {root}: manifest names a path outside the bundle: {rel!r}")
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


def read_manifest(root: str | Path, verify: bool = True) -> dict:
    """Read and verify a bundle's manifest: version, paths inside the bundle, sizes and checksums."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} is not a complete bundle: {MANIFEST} is missing")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise DataError(f"{path}: not an alignkd bundle (the manifest is not a JSON object)")
    if m.get("format") != FORMAT:
        raise DataError(f"{path}: not an alignkd bundle (format {m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: unknown format_version {m.get('format_version')!r} (this reader knows {FORMAT_VERSION})")
    for key, typ in (("files", list), ("artifacts", list), ("model", dict)):
        if key not in m:
            raise DataError(f"{path}: missing field {key!r}")
        if not isinstance(m[key], typ):
            raise DataError(f"{path}: invalid field {key!r}: expected a {typ.__name__}")
    for entry in m["files"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            raise DataError(f"{path}: invalid field 'files': malformed entry {entry!r}")
    if verify:
        for entry in m["files"]:
            f = safe_relpath(root, entry["path"])
            if not f.is_file():
                raise DataError(f"bundle {root}: file {entry['path']} listed in the manifest is missing")
            if f.stat().st_size != entry["size"]:
                raise DataError(f"bundle {root}: {entry['path']} has size {f.stat().st_size}, the manifest says {entry['size']}")
            if sha256_file(f) != entry["sha256"]:
                raise DataError(f"bundle {root}: checksum mismatch for {entry['path']}")
        listed = {e["path"] for e in m["files"]}
        for a in m["artifacts"]:
            for rel in a["files"]:
                safe_relpath(root, rel)
                if rel not in listed:
                    raise DataError(f"bundle {root}: artifact file {rel} is not in the manifest's file list")
    return m


