"""An offline teacher cache: the teacher's top-k log-probs at the KD positions of every training sample,
computed once (`alignkd-mobile teacher-cache`), so that logit KD costs a lookup instead of the teacher's
full forward at every step.

Layout of a cache directory:

    cache.json                  what the cache is for (`CacheSpec`: teacher identity, k, temperature, KD
                                positions, template, vocabulary) and its shards with their sizes and sha256;
                                "complete" is true once every sample is in. Written last, atomically.
    shard-r<rank>-<n>.safetensors   per shard: keys (N, 32) uint8 sample keys, offsets (N+1,) int64 into the
                                rows, logprobs (R, k) float16 and ids (R, k) uint16 (int32 past 65,536 tokens),
                                one row per KD position of each sample, in position order.
    progress-r<rank>.json       a builder's spec and finished shards, so that a killed build continues.

A sample's key is the sha256 of its template, token ids, labels and the sha256 of its image bytes: the same
sample in another order, subset or file is found again; anything that changes what the teacher saw is a
miss. Shards are written whole (temp file + rename), so no shard is ever torn; the reader checks each
shard's size and header before use (not its sha256, which would read every byte at every start) and
memory-maps the rows (a cache of the whole training set need not fit in memory; the page cache is shared by
the ranks of a machine). Size per KD position: 4·k bytes plus 40 bytes per sample (k = 32: 128 bytes).

Building: each rank writes its own shards and progress file (samples are split by key, `rank_of`), rank 0
writes cache.json once all are done, and a second build of the same folder waits for the first (`exclusive`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save
from tqdm import tqdm

from ..data.datasets import collate
from ..distill.losses import kd_positions_mask
from ..distill.topk import teacher_topk
from ..errors import AlignKDError, DataError
from ..model.config import IGNORE_INDEX
from ..fileio import BAD_JSON, atomic_write, remove_stale_temps

FORMAT = "alignkd-teacher-cache"
VERSION = 2
MANIFEST = "cache.json"
# k of a build that does not set loss.kd_topk: 4·32 = 128 bytes per KD position (+ 40 per sample); its "rest"
# bucket keeps full KD's gradient direction (cosine 1.000 where k = 8 drops to 0.983), and on the easy-vqa seeds
# study k = 8, 32 and every token all land within the seeds' noise of online KD (README, Results: Teacher cache).
DEFAULT_CACHE_K = 32
_SAMPLE_BYTES = 1 << 20  # the fingerprint reads this much at three places of each weight file
_SHARD_DTYPES = {"U8": np.uint8, "I64": np.int64, "F16": np.float16, "U16": np.uint16, "I32": np.int32}
_TOPK_ROWS = 4096  # rows per fp32 log-softmax when building: bounds its (rows, V) buffer


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


def image_digest(image: str | Path) -> bytes:
    """sha256 of an image file's bytes."""
    try:
        return hashlib.sha256(Path(image).read_bytes()).digest()
    except OSError as e:
        raise DataError(f"cannot read image {image}: {e.strerror}") from None


def sample_key(template: str, input_ids: list[int], labels: list[int], image_sha256: bytes | None) -> bytes:
    """32-byte content key of one training sample (what the teacher sees and where KD is scored)."""
    h = hashlib.sha256(template.encode() + b"\0")
    h.update(np.asarray(input_ids, np.int64).tobytes() + b"\0")
    h.update(np.asarray(labels, np.int64).tobytes() + b"\0")
    h.update(image_sha256 or b"")
    return h.digest()


def dataset_keys(dataset, template: str) -> list[bytes]:
    """The key of every sample of a `VQADataset`, in order; each image file is hashed once."""
    digests: dict[str, bytes] = {}
    keys = []
    for s in dataset.samples:
        img = s["image"]
        if img is not None and str(img) not in digests:
            digests[str(img)] = image_digest(img)
        keys.append(sample_key(template, s["input_ids"], s["labels"], digests[str(img)] if img is not None else None))
    return keys


def rank_of(key: bytes, world: int) -> int:
    """The rank that computes a sample when `world` ranks build one cache: by key, so a sample repeated in
    the data lands on one rank (computed once) and the shares stay even."""
    return int.from_bytes(key[:8], "little") % world


@dataclass(frozen=True)
class CacheSpec:
    """Everything that must match between the run that made a cache and the run that reads it."""

    teacher: dict
    """`teacher_fingerprint` of the teacher checkpoint (or its preset and seed)."""
    k: int
    """Top-k log-probs kept per KD position (the vocabulary size: every token)."""
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
    recorded in this rank's progress file, so a killed build resumes from its last shard. A folder that
    holds a cache, or a partial build, made for another spec is refused before anything is written."""

    def __init__(self, root: str | Path, spec: CacheSpec, rank: int = 0, shard_samples: int = 2048):
        self.root, self.spec, self.rank, self.shard_samples = Path(root), spec, rank, shard_samples
        self._progress = check_folder(self.root, spec)
        self.root.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            remove_stale_temps(self.root)  # shard temps of a killed build (ranks writing now are alive)
        self.progress_path = self.root / f"progress-r{rank}.json"
        self.shards: list[dict] = self._progress.get(self.progress_path, {}).get("shards", [])
        self._reset()

    def _reset(self) -> None:
        self.keys: list[bytes] = []
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []

    def done_keys(self) -> set[bytes]:
        """Keys already in finished shards, of every rank of earlier builds (whatever their number)."""
        out: set[bytes] = set()
        for prog in self._progress.values():
            for s in prog["shards"]:
                out.update(bytes(k) for k in _open_shard(self.root, s, self.spec.k)["keys"])
        return out

    def add(self, key: bytes, logprobs: torch.Tensor, ids: torch.Tensor) -> None:
        """One sample: (R, k) log-probs and ids of its R KD positions."""
        self.keys.append(key)
        # a probability below float16's range (a small temperature) is kept as its smallest log-prob, not
        # -inf: both are probability 0, but the KD term p·(log p − log q) of -inf is 0·inf = NaN
        lp = np.maximum(logprobs.detach().float().cpu().numpy(), np.finfo(np.float16).min)
        self.rows.append((lp.astype(np.float16),
                          ids.detach().cpu().numpy().astype(_ids_dtype(self.spec.vocab_size))))
        if len(self.keys) >= self.shard_samples:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        counts = [lp.shape[0] for lp, _ in self.rows]
        k, ids_dtype = self.spec.k, _ids_dtype(self.spec.vocab_size)
        arrays = {
            "keys": np.frombuffer(b"".join(self.keys), np.uint8).reshape(len(self.keys), 32),
            "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "logprobs": np.concatenate([lp for lp, _ in self.rows]) if sum(counts) else np.zeros((0, k), np.float16),
            "ids": np.concatenate([i for _, i in self.rows]) if sum(counts) else np.zeros((0, k), ids_dtype),
        }
        name = f"shard-r{self.rank}-{len(self.shards):05d}.safetensors"
        data = save(arrays)
        atomic_write(self.root / name, data)
        self.shards.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                            "samples": len(self.keys), "rows": int(sum(counts))})
        atomic_write(self.progress_path, json.dumps({"spec": dataclasses.asdict(self.spec), "shards": self.shards}))
        self._reset()


def check_folder(root: Path, spec: CacheSpec) -> dict[Path, dict]:
    """Refuse a folder that holds a cache, or a killed build, made for another spec; returns the progress of
    the builds of this spec found there ({progress file: its contents})."""
    if root.exists() and not root.is_dir():
        raise CacheError(f"teacher cache {root} is not a directory")
    if (root / MANIFEST).is_file():
        _check_spec(root, _read_manifest(root)["spec"], spec, MANIFEST)
    progress = {p: _read_record(p, "progress file") for p in sorted(root.glob("progress-r*.json"))}
    for p, prog in progress.items():
        _check_spec(root, prog["spec"], spec, p.name)
    return progress


_ASIDE = ".replaced-"


def _own_files(root: Path) -> list[Path]:
    """A cache's own files, manifest first (a reader trusts the shards only through it)."""
    return [root / MANIFEST, *root.glob("progress-r*.json"), *root.glob("shard-r*-*.safetensors")]


def foreign_entries(root: Path) -> list[str]:
    """What in root no cache build writes: its own files are the manifest, progress files and shards, and its
    temp and set-aside entries are hidden."""
    if not root.is_dir():
        return []
    own = {p.name for p in _own_files(root)}
    return sorted(p.name for p in root.iterdir() if p.name not in own and not p.name.startswith("."))


def set_aside(root: Path) -> Path:
    """`--overwrite`: move the cache's own files (others are left) into a hidden folder inside it, where a
    reader never looks, so that a build which fails before its first shard can put them back (`restore`)."""
    aside = Path(tempfile.mkdtemp(prefix=_ASIDE, dir=root))
    for p in _own_files(root):
        if p.exists():
            os.replace(p, aside / p.name)
    return aside


def restore(root: Path, aside: Path) -> None:
    """Put back what `set_aside` moved, the manifest last; the folder it was in goes."""
    for p in sorted(aside.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(p, root / p.name)
    aside.rmdir()


def discard_replaced(root: Path) -> None:
    """Remove what earlier `--overwrite` builds set aside, once a cache in `root` is complete."""
    for aside in root.glob(_ASIDE + "*"):
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def exclusive(root: Path, log=print):
    """Hold an exclusive lock on the cache folder (flock on the folder itself: no file is added): a second
    build of the same cache, e.g. by a parallel demo worker, waits for the first, then finds its work done."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"teacher cache {root}: waiting for another build of it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def finalize(root: str | Path, spec: CacheSpec) -> dict:
    """Gather every builder's shards into cache.json with complete = true (call once, after all ranks flushed)."""
    root = Path(root)
    shards = []
    for p in sorted(root.glob("progress-r*.json")):
        prog = _read_record(p, "progress file")
        _check_spec(root, prog["spec"], spec, p.name)
        shards += prog["shards"]
    manifest = {"format": FORMAT, "version": VERSION, "spec": dataclasses.asdict(spec), "complete": True,
                "samples": sum(s["samples"] for s in shards), "rows": sum(s["rows"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards), "shards": shards}
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


# ---------------------------------------------------------------------------------------- reading
def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except BAD_JSON as e:
        raise CacheError(f"teacher cache {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise CacheError(f"cannot read teacher cache {what} {path}: {e.strerror}") from None


def _read_record(path: Path, what: str) -> dict:
    """A manifest (what = "manifest": also its format and version) or a progress file: JSON with a spec and
    a list of shards."""
    rec = _read_json(path, what)
    ours = isinstance(rec, dict) and rec.get("format") == FORMAT and rec.get("version") == VERSION
    if what == "manifest" and not ours:
        raise CacheError(f"teacher cache {path}: not a {FORMAT} version {VERSION} manifest")
    try:
        CacheSpec(**rec["spec"])
        if not isinstance(rec["shards"], list) or not isinstance(rec.get("complete", False), bool):
            raise TypeError("'shards' must be a list and 'complete' true or false")
        for s in rec["shards"]:
            name = s["file"]
            # a bare file name: the manifest never points outside its own folder
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise ValueError(f"shard file {name!r} is not a file name in the cache folder")
            if not all(isinstance(s[f], int) and not isinstance(s[f], bool) and s[f] >= 0
                       for f in ("bytes", "samples", "rows")):
                raise ValueError(f"shard {name}: bytes, samples and rows must be counts")
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"teacher cache {path}: malformed {what} ({e})") from None
    return rec


def _read_manifest(root: Path) -> dict:
    if not (root / MANIFEST).is_file():
        raise CacheError(f"teacher cache {root}: no {MANIFEST} (build it with `alignkd-mobile teacher-cache`)")
    return _read_record(root / MANIFEST, "manifest")


def recorded_k(root: str | Path | None) -> int | None:
    """The k a finished cache in `root` was built with; None when there is none to read (opening the cache
    then names what is wrong)."""
    try:
        k = json.loads((Path(root) / MANIFEST).read_text())["spec"]["k"]
    except (TypeError, OSError, ValueError, KeyError):
        return None
    return k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else None


def _check_spec(root: Path, recorded: dict, expected: CacheSpec, where: str) -> None:
    diff = expected.mismatches(CacheSpec(**recorded))
    if diff:
        raise CacheError(f"teacher cache {root} was made for another run ({where}): " + "; ".join(diff))


def _open_shard(root: Path, shard: dict, k: int) -> dict[str, np.ndarray]:
    """A shard's arrays, checked against the manifest (size, samples, rows, k) and its own header; keys and
    offsets in memory, log-probs and ids memory-mapped."""
    path = root / shard["file"]
    if not path.is_file():
        raise CacheError(f"teacher cache {root}: shard {shard['file']} is missing")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise CacheError(f"teacher cache {root}: shard {shard['file']} has {size} bytes, "
                         f"the manifest says {shard['bytes']} (truncated?)")
    want = {"keys": (shard["samples"], 32), "offsets": (shard["samples"] + 1,), "logprobs": (shard["rows"], k),
            "ids": (shard["rows"], k)}
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:  # read as asked, a damaged length would allocate up to 2**64 bytes
                raise ValueError(f"its header length {n} is beyond the file's {size} bytes")
            header = json.loads(f.read(n))
        arrays = {}
        for name, shape in want.items():
            entry = header[name]
            dtype = np.dtype(_SHARD_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            if tuple(entry["shape"]) != shape or end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
                raise ValueError(f"{name} is {entry['shape']} {entry['dtype']}, the manifest needs {list(shape)}")
            if math.prod(shape) == 0:
                arrays[name] = np.zeros(shape, dtype)
            else:
                arrays[name] = np.memmap(path, dtype, "r", offset=8 + n + begin, shape=shape)
    except (OSError, ValueError, KeyError, TypeError, RecursionError, OverflowError) as e:
        raise CacheError(f"teacher cache {root}: shard {shard['file']} is unreadable ({e})") from None
    arrays["keys"], arrays["offsets"] = np.array(arrays["keys"]), np.array(arrays["offsets"])
    if arrays["offsets"][-1] != shard["rows"]:
        raise CacheError(f"teacher cache {root}: shard {shard['file']} has inconsistent offsets")
    return arrays


class TeacherCache:
    """A verified, complete cache: `lookup(key)` → ((R, k) float32 log-probs, (R, k) int64 ids)."""

    def __init__(self, root: str | Path, expected: CacheSpec):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CacheError(f"teacher cache {self.root} does not exist")
        m = _read_manifest(self.root)
        _check_spec(self.root, m["spec"], expected, MANIFEST)
        if not m.get("complete"):
            raise CacheError(f"teacher cache {self.root} is incomplete: rerun `alignkd-mobile teacher-cache` to finish it")
        self.spec, self.manifest = expected, m
        self._shards = [_open_shard(self.root, s, expected.k) for s in m["shards"]]  # all checked before any use
        self._index: dict[bytes, tuple[int, int]] = {}
        for si, arr in enumerate(self._shards):
            for row, key in enumerate(arr["keys"]):
                self._index[bytes(key)] = (si, row)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self):
        return iter(self._index)  # the sample keys

    def lookup(self, key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        si, row = self._index[key]
        arr = self._shards[si]
        a, b = int(arr["offsets"][row]), int(arr["offsets"][row + 1])
        logp, ids = arr["logprobs"][a:b].astype(np.float32), arr["ids"][a:b].astype(np.int64)  # (R, k) each
        # the shards' bytes are memory-mapped, not hashed at open: check the values each lookup reads
        if ids.size and (ids.min() < 0 or ids.max() >= self.spec.vocab_size or not np.isfinite(logp).all()
                         or logp.max() > 0):
            raise CacheError(f"teacher cache {self.root}: shard {self.manifest['shards'][si]['file']} is corrupt (a "
                             f"row holds ids {ids.min()}..{ids.max()} of a {self.spec.vocab_size}-token vocabulary, "
                             f"log-probs {logp.min():.3g}..{logp.max():.3g}): rebuild the cache")
        return torch.from_numpy(logp), torch.from_numpy(ids)

    def rows(self, keys: list[bytes]) -> dict[str, torch.Tensor]:
        """The rows of several samples, concatenated in their order: logprobs (M, k), ids (M, k), and each
        sample's row count, counts (B,)."""
        found = [self.lookup(k) for k in keys]
        return {"logprobs": torch.cat([lp for lp, _ in found]), "ids": torch.cat([i for _, i in found]),
                "counts": torch.tensor([lp.shape[0] for lp, _ in found], dtype=torch.long)}

    def bytes_per_row(self) -> float:
        rows = self.manifest["rows"]
        return self.manifest["bytes"] / rows if rows else float("nan")


# ---------------------------------------------------------------------------------------- building
def pending(keys: list[bytes], writer: CacheWriter, rank: int = 0, world: int = 1) -> tuple[dict[int, bytes], int]:
    """This rank's share of the samples (`rank_of`), less those already in finished shards: ({sample index:
    key} to compute, one index per distinct key; the number of distinct keys in the share)."""
    done = writer.done_keys()
    share: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        if key not in share and rank_of(key, world) == rank:
            share[key] = i
    return {i: key for key, i in share.items() if key not in done}, len(share)


def _topk_rows(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """teacher_topk over (M, V) rows, a block of rows at a time."""
    parts = [teacher_topk(block, k, temperature) for block in logits.split(_TOPK_ROWS)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # (M, k) each


def planned_size(dataset, todo: dict[int, bytes], spec: CacheSpec, num_image_tokens: int) -> tuple[int, int]:
    """(KD positions, bytes) that caching the samples `todo` adds, counted from their tokens before the teacher
    runs: exact for kd_positions text and tokens; for all, a batch's padding is not counted."""
    rows = 0
    for i in todo:
        s = dataset.samples[i]
        if spec.kd_positions == "text":  # position t is scored when label t + 1 is: the image's labels are ignored
            rows += len(s["labels"]) - 1 - s["labels"][1:].count(IGNORE_INDEX)  # C speed: 665k LLaVA samples
        else:  # the image placeholder becomes num_image_tokens positions
            rows += len(s["input_ids"]) + (num_image_tokens - 1 if s["image"] is not None else 0)
    row_bytes = spec.k * (np.dtype(np.float16).itemsize + np.dtype(_ids_dtype(spec.vocab_size)).itemsize)
    return rows, rows * row_bytes + len(todo) * (32 + 8)  # + each sample's key and offset


def teacher_rows(teacher, batch: dict, spec: CacheSpec, amp=contextlib.nullcontext()
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One collated batch (on the teacher's device) → its KD positions' top-k: (M, k) log-probs, (M, k) ids, in
    the batch's sample order, and each sample's row count. amp: the teacher forward's autocast (the top-k is
    taken in float32). Call under inference mode."""
    with amp:
        out = teacher(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                      labels=batch["labels"], compute_loss=False)
    positions = kd_positions_mask(out.labels, out.attention_mask, spec.kd_positions)  # (B, T)
    logp, ids = _topk_rows(out.logits[positions], spec.k, spec.temperature)  # (M, k) each
    return logp, ids, positions.sum(1).tolist()


@torch.inference_mode()
def build(teacher, dataset, writer: CacheWriter, todo: dict[int, bytes], batch_size: int = 8,
          device: torch.device | None = None, autocast_dtype: torch.dtype | None = None, num_workers: int = 0,
          progress: bool = True, total: int | None = None) -> dict:
    """Run the teacher once over the samples `todo` ({index: key}, from `pending`) and write their top-k
    log-probs at the KD positions, in the token layout the student's KD reads (the teacher's, which is the
    same: one tokenizer, one image-token count). Samples of similar length are batched together (less
    padding). Returns the counts and throughput; call `finalize` once every rank is done."""
    device = device or torch.device("cpu")
    spec = writer.spec
    order = sorted(todo, key=lambda i: len(dataset.samples[i]["input_ids"]))
    chunks = [order[a:a + batch_size] for a in range(0, len(order), batch_size)]
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    total = len(todo) if total is None else total
    bar = _bar(total, total - len(todo), f"teacher cache (rank {writer.rank})", progress)
    t0, rows = time.perf_counter(), 0
    if chunks:
        teacher.eval()
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=chunks, num_workers=num_workers, pin_memory=device.type == "cuda",
            collate_fn=functools.partial(collate, pad_id=teacher.config.text.pad_token_id))
        for chunk, batch in zip(chunks, loader):
            batch = {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in batch.items()}
            logp, ids, counts = teacher_rows(teacher, batch, spec, amp)
            for i, lp, ii in zip(chunk, logp.cpu().split(counts), ids.cpu().split(counts)):
                writer.add(todo[i], lp, ii)
            rows += sum(counts)
            bar.update(len(chunk))
    writer.flush()
    bar.close()
    wall = time.perf_counter() - t0
    return {"rank": writer.rank, "samples": total, "computed": len(todo), "kd_positions": rows,
            "wall_s": round(wall, 2), "samples_per_s": round(len(todo) / wall, 2) if todo and wall > 0 else None}


def _bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    # on a terminal the bar redraws freely; in a log file it writes a line every 30 s
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)
