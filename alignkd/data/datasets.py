"""Training data: LLaVA-format JSON + image folder (MobileVLM's fine-tune format), and easy-vqa.

Both yield examples `{"input_ids", "labels", "image"}` through the one data path (templates → tokenize →
preprocess); `collate` pads them on the right and stacks the pixels of the samples that have an image.
Samples longer than the context are dropped and counted, as MobileVLM does; a malformed entry fails with
its index unless `on_malformed="skip"`, which skips and counts it. Every image is checked when the
dataset is built (it opens, its header decodes, it has a size), so a bad one is found before the first
training step, not when its batch is drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AlignKDError, ConfigError, DataError
from ..fileio import BAD_JSON
from ..model.config import IGNORE_INDEX
from . import easyvqa
from .image import ImageProcessingConfig, image_problem, load_image, preprocess
from .templates import IMAGE_TOKEN, SHORT_ANSWER_PROMPT
from .tokenize import SampleTooLongError, build_training_example, pad_right

EASYVQA_SUFFIX = SHORT_ANSWER_PROMPT  # trained with the prompt the evaluation asks with


@dataclass
class LoadStats:
    n_entries: int = 0
    n_too_long: int = 0
    n_malformed: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, msg: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(msg)


PIXEL_CACHE_BYTES = 1 << 30  # per process: a small dataset is held whole, a large one is decoded per access


class VQADataset(torch.utils.data.Dataset):
    """Pre-tokenized (conversation, image) samples; images are decoded and preprocessed on access."""

    def __init__(self, samples: list[dict[str, Any]], image_cfg: ImageProcessingConfig, stats: LoadStats):
        self.samples = samples
        self.image_cfg = image_cfg
        self.stats = stats
        self._pixels: dict[str, torch.Tensor] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, image: str | Path) -> torch.Tensor:
        key = str(image)
        if key in self._pixels:  # small datasets repeat images (easy-vqa: ~10 questions per image)
            return self._pixels[key]
        x = preprocess(load_image(image), self.image_cfg)  # (3, S, S)
        if self._cached_bytes + x.nbytes <= PIXEL_CACHE_BYTES:
            self._pixels[key] = x
            self._cached_bytes += x.nbytes
        return x

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        return {"input_ids": s["input_ids"], "labels": s["labels"],
                "pixel_values": self.pixels(s["image"]) if s["image"] is not None else None}


def _tokenize_all(entries, tokenizer, template, max_length, num_image_tokens, on_malformed, where) -> tuple[list, LoadStats]:
    stats = LoadStats()
    samples = []
    checked: dict[Path, str | None] = {}  # images repeat across samples: each is opened once
    for idx, (conversation, image, problem) in enumerate(entries):
        stats.n_entries += 1
        try:
            if image is not None and not problem:
                if image not in checked:
                    checked[image] = image_problem(image)
                problem = checked[image]
            if problem:
                raise DataError(f"sample {idx}: {problem}")
            ex = build_training_example(conversation, template, tokenizer, image is not None, max_length,
                                        num_image_tokens, sample_id=idx)
        except SampleTooLongError as e:
            stats.n_too_long += 1
            stats.note(str(e))
            continue
        except DataError as e:
            if on_malformed != "skip":
                raise DataError(f"{where}: {e} (use on_malformed=skip to skip and count such entries)") from None
            stats.n_malformed += 1
            stats.note(str(e))
            continue
        samples.append({**ex, "image": image})
    if not samples:  # a run or a cache over nothing: say so before any model loads (max_length below every sample)
        raise DataError(f"{where}: no usable sample ({stats.n_too_long} over max_length {max_length}, "
                        f"{stats.n_malformed} malformed)")
    return samples, stats


def read_text(path: Path, what: str, expected: str, error: type[AlignKDError] = DataError) -> str:
    """A user's UTF-8 text file (`what`: "data file", "config file"; `expected`: its format); missing,
    a folder, another encoding or unreadable is one `error` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a {expected} file") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text (expected {expected})") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None


def llava_json_dataset(json_path: str | Path, image_folder: str | Path | None, tokenizer, template: str,
                       image_cfg: ImageProcessingConfig, max_length: int, num_image_tokens: int = 144,
                       on_malformed: str = "fail") -> VQADataset:
    """A LLaVA/MobileVLM fine-tune JSON: `[{"id", "image": "rel/path.jpg", "conversations": [{"from", "value"}...]}]`."""
    json_path = Path(json_path)
    if on_malformed not in ("fail", "skip"):
        raise ConfigError(f"on_malformed must be 'fail' or 'skip', got {on_malformed!r}")
    try:
        data = json.loads(read_text(json_path, "data file", "LLaVA-format JSON"))
    except BAD_JSON as e:
        raise DataError(f"{json_path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise DataError(f"{json_path}: expected a JSON list of samples")
    folder = Path(image_folder) if image_folder else json_path.parent
    if not folder.is_dir():
        raise DataError(f"image folder {folder} is not a directory")

    def entries():
        for entry in data:
            if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
                yield None, None, "entry has no 'conversations' list"
                continue
            image = entry.get("image")
            if image is not None and not (isinstance(image, str) and image):
                yield None, None, f"'image' must be one file name (a non-empty string), got {_json_kind(image)}"
                continue
            yield entry["conversations"], (folder / image if image is not None else None), None

    samples, stats = _tokenize_all(entries(), tokenizer, template, max_length, num_image_tokens, on_malformed,
                                   str(json_path))
    return VQADataset(samples, image_cfg, stats)


def _json_kind(value: Any) -> str:
    kinds = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object", str: "\"\""}
    return kinds.get(type(value), type(value).__name__)


_EASYVQA_CACHE: dict[tuple, VQADataset] = {}


def easyvqa_dataset(split: str, tokenizer, image_cfg: ImageProcessingConfig, max_length: int,
                    num_image_tokens: int = 144, template: str = "v1", limit: int | None = None,
                    seed: int = 0) -> VQADataset:
    """easy-vqa (MIT; shipped in the `easy-vqa` package): 64×64 shape images, 13 one-word answers.

    Kept in memory per process: the demo trains three models on the same tokenized split and images."""
    key = (split, getattr(tokenizer, "alignkd_source_dir", id(tokenizer)), len(tokenizer), str(image_cfg), max_length,
           num_image_tokens, template, limit, seed)
    if key not in _EASYVQA_CACHE:
        _EASYVQA_CACHE.clear()
        _EASYVQA_CACHE[key] = _easyvqa_dataset(split, tokenizer, image_cfg, max_length, num_image_tokens, template,
                                               limit, seed)
    return _EASYVQA_CACHE[key]


def _easyvqa_dataset(split, tokenizer, image_cfg, max_length, num_image_tokens, template, limit, seed) -> VQADataset:
    entries = (((f"{IMAGE_TOKEN}\n{q.question}\n{EASYVQA_SUFFIX}", q.answer), q.image, None)
               for q in easyvqa.questions(split, limit, seed))
    samples, stats = _tokenize_all(entries, tokenizer, template, max_length, num_image_tokens, "fail", "easy-vqa")
    return VQADataset(samples, image_cfg, stats)


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor | None]:
    """Right-pad ids (pad_id) and labels (IGNORE_INDEX); stack the pixels of samples with an image."""
    ids, mask = pad_right([b["input_ids"] for b in batch], pad_id)  # (B, T)
    labels, _ = pad_right([b["labels"] for b in batch], IGNORE_INDEX)  # (B, T)
    pixels = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.stack(pixels) if pixels else None}
