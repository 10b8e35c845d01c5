"""An offline teacher cache: the teacher's top-k log-probs at the KD positions of every training sample,
computed once, so that logit KD costs a lookup instead of the teacher's full forward at every step.

Layout of a cache directory:

    cache.json                  what the cache is for (`CacheSpec`: teacher identity, k, temperature, KD
                                positions, template, vocabulary) and its shards with their sizes and sha256;
                                "complete" is true once every sample is in. Written last, atomically.
    shard-r<rank>-<n>.safetensors   per shard: keys (N, 32) uint8 sample keys, offsets (N+1,) int64 into the
                                rows, logprobs (R, k) float16 and ids (R, k) uint16 (int32 past 65,536 tokens),
                                one row per KD position of each sample, in position order.
    progress-r<rank>.json       a builder's finished shards, so that a killed build continues where it was.

A sample's key is the sha256 of its template, token ids, labels and image bytes: the same sample in another
order, subset or file is found again; anything that changes what the teacher saw is a miss. Shards are
written whole (temp file + rename), so no shard is ever torn; the reader checks each shard's size before
use. Size per KD token: 4·k bytes plus a little per sample (k = 32: 128 bytes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from ..errors import AlignKDError, DataError
from ..fileio import atomic_write, remove_stale_temps

FORMAT = "alignkd-teacher-cache"
VERSION = 1
MANIFEST = "cache.json"
_SAMPLE_BYTES = 1 << 20  # the fingerprint reads this much at three places of each weight file


class CacheError(AlignKDError):
    """A teacher cache is missing, incomplete, truncated, or made for another run."""


# ---------------------------------------------------------------------------------------- identity
def teacher_fingerprint(ckpt_dir: str | Path) -> dict[str, str]:
    """What identifies a teacher without reading all of it: sha256 of config.json, and of every weight
    file's name, size, safetensors header and three 1 MiB samples (start, middle, end)."""
    ckpt_dir = Path(ckpt_dir)
    config = ckpt_dir / "config.json"
    if not config.is_file():
        raise CacheError(f"teacher {ckpt_dir}: no config.json")
    files = sorted(p for p in ckpt_dir.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not files:
        raise CacheError(f"teacher {ckpt_dir}: no weight files (*.safetensors, *.bin)")
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for at in sorted({0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)}):
                fh.seek(at)
                h.update(fh.read(_SAMPLE_BYTES))
    return {"config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(), "weights_fingerprint": h.hexdigest()}


def sample_key(template: str, input_ids: list[int], labels: list[int], image: str | Path | None) -> bytes:
    """32-byte content key of one training sample (what the teacher sees and where KD is scored)."""
    h = hashlib.sha256(template.encode() + b"\0")
    h.update(np.asarray(input_ids, np.int64).tobytes() + b"\0")
    h.update(np.asarray(labels, np.int64).tobytes() + b"\0")
    if image is not None:
        try:
            h.update(Path(image).read_bytes())
        except OSError as e:
            raise DataError(f"cannot read image {image}: {e.strerror}") from None
    return h.digest()


@dataclass(frozen=True)
class CacheSpec:
    """Everything that must match between the run that made a cache and the run that reads it."""

    teacher: dict
    """`teacher_fingerprint` of the teacher checkpoint."""
    k: int
    """Top-k log-probs kept per KD position."""
    temperature: float
    """KD temperature the log-probs were taken at (log_softmax(logits / T))."""
    kd_positions: str
    """Which positions carry KD (alignkd.distill.losses.kd_positions_mask)."""
    template: str
    """Conversation template of the samples."""
    vocab_size: int
    """Teacher vocabulary (the ids' range)."""

    def mismatches(self, other: "CacheSpec") -> list[str]:
        return [f"{f.name}: cache {getattr(other, f.name)!r}, run {getattr(self, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _ids_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


# ---------------------------------------------------------------------------------------- writing
class CacheWriter:
    """Appends samples to shards of `shard_samples` samples; each full shard is written atomically and
    recorded in this rank's progress file, so a killed build resumes from its last shard."""

    def __init__(self, root: str | Path, spec: CacheSpec, rank: int = 0, shard_samples: int = 2048):
        self.root, self.spec, self.rank, self.shard_samples = Path(root), spec, rank, shard_samples
        self.root.mkdir(parents=True, exist_ok=True)
        existing = _read_manifest(self.root) if (self.root / MANIFEST).is_file() else None
        if existing is not None:
            _check_spec(self.root, existing, spec)  # nothing is written into a cache made for another run
        remove_stale_temps(self.root)  # shard temps of a killed build
        self.progress_path = self.root / f"progress-r{rank}.json"
        self.shards: list[dict] = json.loads(self.progress_path.read_text())["shards"] if self.progress_path.is_file() else []
        self._reset()

    def _reset(self) -> None:
        self.keys: list[bytes] = []
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []

    def done_keys(self) -> set[bytes]:
        """Keys already in this rank's finished shards."""
        out: set[bytes] = set()
        for s in self.shards:
            out.update(bytes(k) for k in _load_shard(self.root, s)["keys"])
        return out

    def add(self, key: bytes, logprobs: torch.Tensor, ids: torch.Tensor) -> None:
        """One sample: (R, k) log-probs and ids of its R KD positions."""
        self.keys.append(key)
        self.rows.append((logprobs.detach().float().cpu().numpy().astype(np.float16),
                          ids.detach().cpu().numpy().astype(_ids_dtype(self.spec.vocab_size))))
        if len(self.keys) >= self.shard_samples:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        counts = [lp.shape[0] for lp, _ in self.rows]
        k = self.spec.k
        arrays = {
            "keys": np.frombuffer(b"".join(self.keys), np.uint8).reshape(len(self.keys), 32),
            "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "logprobs": np.concatenate([lp for lp, _ in self.rows]) if sum(counts) else np.zeros((0, k), np.float16),
            "ids": np.concatenate([i for _, i in self.rows]) if sum(counts) else np.zeros((0, k), _ids_dtype(self.spec.vocab_size)),
        }
        name = f"shard-r{self.rank}-{len(self.shards):05d}.safetensors"
        data = save(arrays)
        atomic_write(self.root / name, data)
        self.shards.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                            "samples": len(self.keys), "rows": int(sum(counts))})
        atomic_write(self.progress_path, json.dumps({"spec": dataclasses.asdict(self.spec), "shards": self.shards}))
        self._reset()


def finalize(root: str | Path, spec: CacheSpec, world: int = 1) -> dict:
    """Gather every rank's shards into cache.json with complete = true (call once, after all ranks flushed)."""
    root = Path(root)
    shards = []
    for r in range(world):
        p = root / f"progress-r{r}.json"
        if p.is_file():
            shards += json.loads(p.read_text())["shards"]
    manifest = {"format": FORMAT, "version": VERSION, "spec": dataclasses.asdict(spec), "complete": True,
                "samples": sum(s["samples"] for s in shards), "rows": sum(s["rows"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards), "shards": shards}
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


# ---------------------------------------------------------------------------------------- reading
def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"teacher cache {root}: no {MANIFEST} (build it with `alignkd-mobile teacher-cache`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"teacher cache {path} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise CacheError(f"teacher cache {path}: not a {FORMAT} version {VERSION} manifest")
    try:
        CacheSpec(**m["spec"])
        for s in m["shards"]:
            str(s["file"]), int(s["bytes"]), int(s["samples"])
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"teacher cache {path}: malformed manifest ({e})") from None
    return m


def _check_spec(root: Path, manifest: dict, expected: CacheSpec) -> None:
    diff = expected.mismatches(CacheSpec(**manifest["spec"]))
    if diff:
        raise CacheError(f"teacher cache {root} was made for another run: " + "; ".join(diff))


def _load_shard(root: Path, shard: dict) -> dict[str, np.ndarray]:
    path = root / shard["file"]
    if not path.is_file():
        raise CacheError(f"teacher cache {root}: shard {shard['file']} is missing")
    if path.stat().st_size != shard["bytes"]:
        raise CacheError(f"teacher cache {root}: shard {shard['file']} has {path.stat().st_size} bytes, "
                         f"the manifest says {shard['bytes']} (truncated?)")
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CacheError(f"teacher cache {root}: shard {shard['file']} is unreadable ({e})") from None
    if arrays["keys"].shape[0] != shard["samples"]:
        raise CacheError(f"teacher cache {root}: shard {shard['file']} holds {arrays['keys'].shape[0]} samples, "
                         f"the manifest says {shard['samples']}")
    return arrays


class TeacherCache:
    """A verified, complete cache in memory: `lookup(key)` → ((R, k) float32 log-probs, (R, k) int64 ids)."""

    def __init__(self, root: str | Path, expected: CacheSpec):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CacheError(f"teacher cache {self.root} does not exist")
        m = _read_manifest(self.root)
        _check_spec(self.root, m, expected)
        if not m.get("complete"):
            raise CacheError(f"teacher cache {self.root} is incomplete: rerun `alignkd-mobile teacher-cache` to finish it")
        self.spec, self.manifest = expected, m
        self._shards = [_load_shard(self.root, s) for s in m["shards"]]  # every size checked before any use
        self._index: dict[bytes, tuple[int, int]] = {}
        for si, arr in enumerate(self._shards):
            for row, key in enumerate(arr["keys"]):
                self._index[bytes(key)] = (si, row)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        si, row = self._index[key]
        arr = self._shards[si]
        a, b = int(arr["offsets"][row]), int(arr["offsets"][row + 1])
        return (torch.from_numpy(arr["logprobs"][a:b].astype(np.float32)),
                torch.from_numpy(arr["ids"][a:b].astype(np.int64)))

    def bytes_per_row(self) -> float:
        rows = self.manifest["rows"]
        return self.manifest["bytes"] / rows if rows else float("nan")


# ---------------------------------------------------------------------------------------- building
def dataset_keys(dataset, template: str, indices=None) -> dict[int, bytes]:
    """{sample index: key} for a `VQADataset` (every sample, or `indices`)."""
    idx = range(len(dataset.samples)) if indices is None else indices
    return {i: sample_key(template, dataset.samples[i]["input_ids"], dataset.samples[i]["labels"],
                          dataset.samples[i]["image"]) for i in idx}


@torch.inference_mode()
def build(teacher, dataset, root: str | Path, spec: CacheSpec, batch_size: int = 8, device: torch.device | None = None,
          autocast_dtype: torch.dtype | None = None, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Run the teacher once over this rank's share of `dataset` (samples rank, rank + world, …) and write
    the top-k log-probs at the KD positions; samples already in finished shards are skipped (resume). The
    last rank to finish is not special: call `finalize` after every rank returned (torchrun: after a barrier).
    Returns this rank's counts and throughput."""
    import time

    from tqdm import tqdm

    from ..data.datasets import collate
    from ..distill.losses import kd_positions_mask
    from ..distill.topk import teacher_topk

    device = device or torch.device("cpu")
    teacher.eval()
    writer = CacheWriter(root, spec, rank)
    done = writer.done_keys()
    keys = dataset_keys(dataset, spec.template, range(rank, len(dataset.samples), world))
    todo, seen = [], set(done)
    for i, key in keys.items():  # a sample repeated in the data is computed once
        if key not in seen:
            seen.add(key)
            todo.append(i)
    pad = teacher.config.text.pad_token_id
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    t0, rows = time.perf_counter(), 0
    bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc=f"teacher cache (rank {rank})", disable=not progress,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    for a in range(0, len(todo), batch_size):
        chunk = todo[a:a + batch_size]
        batch = {k: (v.to(device) if v is not None else None) for k, v in collate([dataset[i] for i in chunk], pad).items()}
        with amp:
            out = teacher(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                          labels=batch["labels"], compute_loss=False)
        positions = kd_positions_mask(out.labels, out.attention_mask, spec.kd_positions)  # (B, T) the student's layout
        for j, i in enumerate(chunk):
            logp, ids = teacher_topk(out.logits[j][positions[j]], spec.k, spec.temperature)  # (R, k) each
            writer.add(keys[i], logp, ids)
            rows += logp.shape[0]
        bar.update(len(chunk))
    writer.flush()
    bar.close()
    wall = time.perf_counter() - t0
    return {"rank": rank, "samples": len(keys), "computed": len(todo), "kd_positions": rows, "wall_s": round(wall, 2),
            "samples_per_s": round(len(todo) / wall, 2) if wall > 0 else None}
