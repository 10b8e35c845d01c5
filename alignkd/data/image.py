"""The one image preprocessing path, shared by training, evaluation, export and the desktop emulator.

MobileVLM V2 pads an image to a square with the CLIP mean colour, then runs HF's CLIPImageProcessor
(resize shortest edge with PIL bicubic, centre crop, rescale 1/255, normalize). It is written out
here with PIL and numpy, step by step, because the emulator and the Android port re-implement it and
need something explicit to follow; a test checks it against transformers' own CLIPImageProcessor.
"""

from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from alignkd.errors import ConfigError, DataError
from alignkd.model.config import CLIP_MEAN, CLIP_STD, MobileVLMConfig

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# HF preprocessor_config.json stores PIL's resample enum as an int.
_RESAMPLE_FROM_INT = {int(v): k for k, v in _RESAMPLE.items()}


@dataclass
class ImageProcessingConfig:
    """What a model expects of its pixels. Defaults are MobileVLM V2's (CLIP ViT-L/14 at 336 px)."""

    image_size: int = 336
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if (not isinstance(v, (list, tuple)) or len(v) != 3
                    or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v)):
                raise ConfigError(f"{name} must be 3 finite numbers (R, G, B), got {v!r}")
            setattr(self, name, tuple(float(x) for x in v))
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size <= 0:
            raise ConfigError(f"image_size must be a positive integer, got {self.image_size!r}")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"image_std must be positive, got {self.image_std}")
        if not isinstance(self.pad_to_square, bool):  # "no" would be truthy
            raise ConfigError(f"pad_to_square must be true or false, got {self.pad_to_square!r}")
        if self.resample not in _RESAMPLE:
            raise ConfigError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")

    @property
    def background(self) -> tuple[int, int, int]:
        """Padding colour: the mean as MobileVLM computes it, int(x*255) -> (122, 116, 104) for CLIP."""
        return tuple(int(x * 255) for x in self.image_mean)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessingConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown image processing field(s) {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_clip_preprocessor_config(cls, d: dict[str, Any], pad_to_square: bool = True) -> "ImageProcessingConfig":
        """Read an HF CLIP preprocessor_config.json. Only shortest-edge resize + square crop is supported,
        as MobileVLM's vision towers use; anything else would silently change the pixels."""
        crop = d.get("crop_size", d.get("size"))
        size = d.get("size", crop)
        crop_s = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
        if isinstance(crop, dict) and crop.get("height") != crop.get("width", crop.get("height")):
            raise ConfigError(f"preprocessor_config.json: non-square crop_size {crop} is not supported")
        # {"height", "width"} would resize without keeping the aspect ratio: not what CLIP towers do.
        size_s = size.get("shortest_edge") if isinstance(size, dict) else size
        if not isinstance(crop_s, int) or crop_s != size_s:
            raise ConfigError(
                f"preprocessor_config.json: size {size} and crop_size {crop} must name the same square size"
            )
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(flag, True) is False:
                raise ConfigError(f"preprocessor_config.json: {flag}=false is not supported")
        if abs(float(d.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
            raise ConfigError(f"preprocessor_config.json: rescale_factor must be 1/255, got {d['rescale_factor']}")
        resample = d.get("resample", 3)
        resample = _RESAMPLE_FROM_INT.get(resample, resample) if isinstance(resample, int) else resample
        return cls(
            image_size=crop_s,
            image_mean=d.get("image_mean", CLIP_MEAN),
            image_std=d.get("image_std", CLIP_STD),
            pad_to_square=pad_to_square,
            resample=resample,
        )


def image_config(config: MobileVLMConfig) -> ImageProcessingConfig:
    """The pixels a model expects, from its vision config (pad to square, then CLIP's processor)."""
    v = config.vision
    # MobileVLMConfig refuses an image_aspect_ratio other than "pad" and "square" (no padding)
    return ImageProcessingConfig(image_size=v.image_size, image_mean=v.image_mean, image_std=v.image_std,
                                 pad_to_square=config.image_aspect_ratio == "pad")


def load_image(source: str | Path | bytes) -> Image.Image:
    """Open an image as RGB, decoding it fully now so that a truncated file fails here, naming itself,
    rather than deep inside a training step."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        if not isinstance(source, (bytes, bytearray)) and not stat.S_ISREG(os.stat(source).st_mode):
            raise DataError(f"image {name} is not a file")  # a folder, or a pipe that would block the read
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except FileNotFoundError:
        raise DataError(f"image not found: {name}") from None
    except OSError as e:
        raise DataError(f"cannot read image {name}: {e}") from None
    try:
        with fp, Image.open(fp) as img:
            problem = _size_problem(*img.size)
            if problem:
                raise DataError(f"image {name} {problem}")
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:  # PIL's own message names the file object, not the file
        raise DataError(f"image {name} is not in an image format PIL reads") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {name}: {e}") from None


def image_problem(path: Path) -> str | None:
    """Why `path` is not a usable image (missing, not a file, unknown format, corrupt header or data, no
    pixels), or None. Cheap: the header is decoded and the file's structure checked, pixels are not."""
    if path.exists() and not (path.is_file() or path.is_dir()):  # a pipe or a device would block the read
        return f"image {path} is not a file"
    try:
        with Image.open(path) as img:
            w, h = img.size
            img.verify()
    except FileNotFoundError:
        return f"image {path} not found"
    except IsADirectoryError:
        return f"image {path} is a directory"
    except UnidentifiedImageError:
        return f"image {path} is not in an image format PIL reads"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"image {path} is corrupt or truncated ({e})"
    problem = _size_problem(w, h)
    return f"image {path} {problem}" if problem else None


def _size_problem(w: int, h: int) -> str | None:
    """An image with no pixels, or so thin that its padded square (`expand_to_square`) passes PIL's
    decompression-bomb limit: a 1×100000 PNG of 471 bytes would need a 30 GB canvas."""
    if w <= 0 or h <= 0:
        return f"has no pixels ({w}x{h})"
    if Image.MAX_IMAGE_PIXELS and max(w, h) ** 2 > Image.MAX_IMAGE_PIXELS:
        return (f"is {w}x{h}: its padded square would have {max(w, h) ** 2:,} pixels, more than PIL's limit "
                f"({Image.MAX_IMAGE_PIXELS:,})")
    return None


def expand_to_square(img: Image.Image, background: Sequence[int] = (122, 116, 104)) -> Image.Image:
    """MobileVLM's expand2square: paste the image centred on a square canvas of the background colour,
    so the later centre crop keeps the whole picture."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), tuple(background))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess(img: Image.Image, cfg: ImageProcessingConfig) -> torch.Tensor:
    """PIL image -> float32 tensor (3, S, S), exactly as MobileVLM feeds its vision tower.

    Steps (HF CLIPImageProcessor semantics):
      1. RGB; pad to square with `cfg.background` if `cfg.pad_to_square`;
      2. resize so the shortest edge is S, the other edge int(S * long / short) (truncated), with PIL
         resampling (bicubic) on the uint8 image;
      3. centre crop S x S, top = (h - S) // 2, left = (w - S) // 2;
      4. x / 255 in float64, cast to float32, then (x - mean) / std in float32; HWC -> CHW.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    if cfg.pad_to_square:
        img = expand_to_square(img, cfg.background)
    s = cfg.image_size
    w, h = img.size
    if (w, h) != (s, s):
        if w <= h:
            new_w, new_h = s, int(s * h / w)
        else:
            new_w, new_h = int(s * w / h), s
        img = img.resize((new_w, new_h), resample=_RESAMPLE[cfg.resample])
    arr = np.asarray(img, dtype=np.uint8)
    h, w = arr.shape[:2]
    top, left = (h - s) // 2, (w - s) // 2
    arr = arr[top : top + s, left : left + s]
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, dtype=np.float32)) / np.asarray(cfg.image_std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def preprocess_batch(images: Sequence[Image.Image], cfg: ImageProcessingConfig) -> torch.Tensor:
    """A list of PIL images -> (B, 3, S, S)."""
    if not images:
        raise DataError("preprocess_batch got no images")
    return torch.stack([preprocess(im, cfg) for im in images])
