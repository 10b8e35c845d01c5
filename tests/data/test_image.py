"""Preprocessing parity with transformers' CLIP image processor (the PIL backend, which is what
MobileVLM ran: transformers 4.x's slow CLIPImageProcessor), plus MobileVLM's pad-to-square."""

from __future__ import annotations

import io
import os
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from alignkd.data.image import (
    ImageProcessingConfig,
    expand_to_square,
    image_problem,
    load_image,
    preprocess,
    preprocess_batch,
)
from alignkd.errors import ConfigError, DataError

# openai/clip-vit-large-patch14-336's preprocessor_config.json (old integer format), as MobileVLM uses it.
CLIP_336 = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336,
}


def _mobilevlm_expand2square(pil_img, background_color):
    """MobileVLM's mobilevlm/utils.py expand2square, verbatim in behaviour."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def _hf(cfg: ImageProcessingConfig) -> CLIPImageProcessorPil:
    s = cfg.image_size
    return CLIPImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std), resample=3,
    )


def _reference(img: Image.Image, cfg: ImageProcessingConfig) -> torch.Tensor:
    """MobileVLM's process_images with image_aspect_ratio='pad'."""
    proc = _hf(cfg)
    if cfg.pad_to_square:
        img = _mobilevlm_expand2square(img.convert("RGB"), tuple(int(x * 255) for x in proc.image_mean))
    return torch.as_tensor(np.asarray(proc(img, return_tensors="np")["pixel_values"][0]))


def _random_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth + noisy content so that resampling differences would show
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 7 + y * 3) % 256, (x * x + y) % 256, (y * 5) % 256], -1)
    arr = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


SIZES = [(336, 336), (640, 480), (480, 640), (1000, 333), (7, 5), (64, 64), (337, 335), (1, 40), (900, 901)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pad", [True, False])
def test_parity_with_hf_clip_processor(size, pad):
    cfg = ImageProcessingConfig(pad_to_square=pad)
    img = _random_image(*size, seed=size[0] * 1000 + size[1])
    ours, ref = preprocess(img, cfg), _reference(img, cfg)
    assert ours.dtype == torch.float32 and ours.shape == (3, 336, 336)
    assert ref.shape == ours.shape
    assert (ours - ref).abs().max().item() <= 1e-6  # bit-exact in practice: same PIL resize, same float steps


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_parity_other_modes(mode):
    img = _random_image(300, 200, mode)
    cfg = ImageProcessingConfig()
    assert (preprocess(img, cfg) - _reference(img.convert("RGB"), cfg)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("image_size", [48, 96])
def test_parity_tiny_sizes(image_size):
    import easy_vqa

    cfg = ImageProcessingConfig(image_size=image_size)
    paths = sorted(easy_vqa.get_train_image_paths().values())[:4]  # {image_id: path}
    imgs = [load_image(p) for p in paths] + [_random_image(70, 50)]
    batch = preprocess_batch(imgs, cfg)
    assert batch.shape == (5, 3, image_size, image_size)
    ref = torch.stack([_reference(im, cfg) for im in imgs])
    assert (batch - ref).abs().max().item() <= 1e-6


def test_expand_to_square_matches_mobilevlm():
    cfg = ImageProcessingConfig()
    assert cfg.background == (122, 116, 104)
    for size in [(10, 4), (4, 10), (5, 5), (9, 4), (4, 9)]:
        img = _random_image(*size)
        ours, ref = expand_to_square(img, cfg.background), _mobilevlm_expand2square(img, cfg.background)
        assert ours.size == ref.size and np.array_equal(np.asarray(ours), np.asarray(ref))


def test_config_round_trip_and_clip_config(tmp_path):
    cfg = ImageProcessingConfig(image_size=48, pad_to_square=False)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ImageProcessingConfig.from_dict(d) == cfg
    assert ImageProcessingConfig.from_clip_preprocessor_config(CLIP_336) == ImageProcessingConfig()
    saved = tmp_path / "p"
    _hf(ImageProcessingConfig(image_size=96)).save_pretrained(saved)  # the new dict format
    new = json.loads((saved / "preprocessor_config.json").read_text())
    assert ImageProcessingConfig.from_clip_preprocessor_config(new) == ImageProcessingConfig(image_size=96)
    with pytest.raises(ConfigError, match="unknown image processing field"):
        ImageProcessingConfig.from_dict({"image_size": 3, "colour": 1})
    with pytest.raises(ConfigError, match="crop_size"):
        ImageProcessingConfig.from_clip_preprocessor_config({**CLIP_336, "crop_size": 224})
    with pytest.raises(ConfigError, match="must name the same square size"):
        ImageProcessingConfig.from_clip_preprocessor_config({**CLIP_336, "size": {"height": 336, "width": 336}})
    with pytest.raises(ConfigError, match="do_center_crop=false"):
        ImageProcessingConfig.from_clip_preprocessor_config({**CLIP_336, "do_center_crop": False})
    with pytest.raises(ConfigError, match="image_size"):
        ImageProcessingConfig(image_size=0)
    with pytest.raises(ConfigError, match="resample"):
        ImageProcessingConfig(resample="box")
    with pytest.raises(ConfigError, match="pad_to_square must be true or false, got 'no'"):
        ImageProcessingConfig(pad_to_square="no")


@pytest.mark.parametrize("bad", [5, None, [0.5, 0.5], [0.5, "0.5", 0.5], [0.5, 0.5, 0.5, 0.5], [float("nan"), 1, 1],
                                 [0.5, float("inf"), 0.5]])
def test_mean_and_std_must_be_three_finite_numbers(bad):
    with pytest.raises(ConfigError, match=r"^image_mean must be 3 finite numbers \(R, G, B\)"):
        ImageProcessingConfig(image_mean=bad)
    with pytest.raises(ConfigError, match=r"^image_std must be 3 finite numbers"):
        ImageProcessingConfig.from_clip_preprocessor_config({**CLIP_336, "image_std": bad})
    with pytest.raises(ConfigError, match="image_std must be positive"):
        ImageProcessingConfig(image_std=[0.5, 0, 0.5])


def test_load_image(tmp_path):
    img = _random_image(40, 30)
    p = tmp_path / "ok.png"
    img.save(p)
    assert load_image(p).mode == "RGB" and load_image(p).size == (40, 30)
    buf = io.BytesIO()
    img.convert("L").save(buf, format="JPEG")
    assert load_image(buf.getvalue()).mode == "RGB"


def test_load_image_errors(tmp_path):
    with pytest.raises(DataError, match=r"image not found: .*missing\.png"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"image .*bad\.jpg is not in an image format PIL reads"):
        load_image(bad)
    # truncated files: the header parses, the pixel data is cut short; only img.load() notices
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        _random_image(200, 200).save(buf, format=fmt)
        cut = tmp_path / f"cut.{fmt.lower()}"
        cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(DataError, match=rf"cannot decode image .*cut\.{fmt.lower()}"):
            load_image(cut)
    with pytest.raises(DataError, match="is not a file"):
        load_image(tmp_path)  # a directory
    os.mkfifo(tmp_path / "pipe.png")  # read, it would block forever
    with pytest.raises(DataError, match="pipe.png is not a file"):
        load_image(tmp_path / "pipe.png")
    assert image_problem(tmp_path / "pipe.png").endswith("pipe.png is not a file")
    # 471 bytes whose padded square needs a 30 GB canvas: refused from the header, before any pixel is decoded
    Image.new("RGB", (1, 100_000)).save(tmp_path / "thin.png")
    with pytest.raises(DataError, match=r"thin.png is 1x100000: its padded square would have 10,000,000,000 pixels"):
        load_image(tmp_path / "thin.png")
    assert "its padded square" in image_problem(tmp_path / "thin.png")
    Image.new("RGB", (1, 9_000)).save(tmp_path / "tall.png")  # 81 M pixels padded: under PIL's limit, loads
    assert load_image(tmp_path / "tall.png").size == (1, 9_000)
    with pytest.raises(DataError, match="no images"):
        preprocess_batch([], ImageProcessingConfig())
