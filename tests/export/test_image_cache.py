"""The image-token cache (hit, miss, eviction, a changed image is a miss) and the one preprocessing path, in
the decoding loop and through the emulator on a real bundle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from alignkd.data.image import image_config, load_image, preprocess
from alignkd.errors import ConfigError, DataError
from alignkd.export.base import EagerRuntime
from alignkd.export.runtime import ImageTokenCache, PromptPrefix, generate

PROMPT = [1, 17, -200, 23, 9, 40]
# ImageTokenCache.key of easy-vqa test image 0 preprocessed at 48 px (the `tiny48` vector config); the
# Kotlin core pins the same value (ImageTokenCacheTest.keyIsThePythonKey): both sides hash the same bytes.
EASYVQA0_TINY48_KEY = "9b44eea4b90586606580a86518b5d0d224ddb7ced70f28c5087bc07493bd98b5"


class Counting(EagerRuntime):
    """The eager runtime, counting how often the vision encoder runs."""

    def __init__(self, model):
        super().__init__(model)
        self.encodes = 0

    def encode_image(self, pixels):
        self.encodes += 1
        return super().encode_image(pixels)


def test_lru_hit_miss_and_eviction():
    c = ImageTokenCache(2)
    a, b, d = (np.full((2, 3), v, np.float32) for v in (1, 2, 3))
    c.put("a", a)
    c.put("b", b)
    assert c.get("a")[0, 0] == 1 and c.keys() == ["b", "a"]  # a hit makes "a" the most recent
    c.put("d", d)
    assert c.keys() == ["a", "d"] and c.get("b") is None
    a[0, 0] = 9  # the cache holds its own copy
    assert c.get("a")[0, 0] == 1
    zero = ImageTokenCache(0)
    zero.put("a", a)
    assert zero.get("a") is None and len(zero) == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="capacity"):
            ImageTokenCache(bad)


def test_key_is_the_kotlin_key():
    from alignkd.data import easyvqa
    from alignkd.data.image import ImageProcessingConfig

    cfg = ImageProcessingConfig(image_size=48)
    px = preprocess(load_image(easyvqa.first_test_image()), cfg)[None].numpy()
    assert ImageTokenCache.key(px) == EASYVQA0_TINY48_KEY
    assert ImageTokenCache.key(px.astype(np.float64)) == EASYVQA0_TINY48_KEY  # the float32 bytes are hashed


def test_follow_up_skips_the_encoder_and_a_changed_image_misses(tiny_student, pixels):
    rt, cache = Counting(tiny_student), ImageTokenCache(2)
    px = pixels[:1].numpy()
    cold = generate(rt, PROMPT, px, 5, eos_id=-1, image_cache=cache)
    warm = generate(rt, PROMPT, px, 5, eos_id=-1, image_cache=cache)
    assert rt.encodes == 1 and not cold.timings["image_cached"] and warm.timings["image_cached"]
    assert warm.tokens == cold.tokens
    np.testing.assert_array_equal(warm.prompt_logits, cold.prompt_logits)
    changed = px.copy()
    changed[0, 0, 0, 0] += 1e-3  # one value of one pixel
    third = generate(rt, PROMPT, changed, 5, eos_id=-1, image_cache=cache)
    assert rt.encodes == 2 and not third.timings["image_cached"]
    generate(rt, PROMPT, pixels[1:].numpy(), 5, eos_id=-1, image_cache=cache)  # a third image evicts the first
    assert rt.encodes == 3 and ImageTokenCache.key(px) not in cache.keys() and len(cache) == 2
    assert not generate(rt, PROMPT, px, 5, eos_id=-1, image_cache=cache).timings["image_cached"]


def test_a_follow_up_prefills_only_its_new_text_after_the_kept_prefix(tiny_student, pixels):
    """Same ids before the image, same image, still cached: start after the image; the logits and tokens are
    those of a full prefill. Another image, another text before it, or an evicted image: a full prefill."""
    rt, cache, prefix = Counting(tiny_student), ImageTokenCache(1), PromptPrefix()
    px = pixels[:1].numpy()
    follow = PROMPT[:3] + [31, 7, 12, 5]  # the same system text and image, another question

    def ask(ids, image):
        return generate(rt, ids, image, 4, eos_id=-1, image_cache=cache, prefix=prefix)

    first = ask(PROMPT, px)
    second = ask(follow, px)
    fresh = generate(EagerRuntime(tiny_student), follow, px, 4, eos_id=-1)
    assert not first.timings["prefix_reused"] and second.timings["prefix_reused"] and rt.encodes == 1
    assert second.timings["prefill_positions"] == len(follow) - 3  # the question only, not the 144 image tokens
    np.testing.assert_allclose(second.prompt_logits, fresh.prompt_logits, rtol=1e-5, atol=1e-5)
    assert second.tokens == fresh.tokens
    third = ask(PROMPT, px)  # back to the first question: the answer's positions are dropped again
    np.testing.assert_allclose(third.prompt_logits, first.prompt_logits, rtol=1e-5, atol=1e-5)
    assert third.timings["prefix_reused"]
    assert not ask([1, 18] + PROMPT[2:], px).timings["prefix_reused"]  # other text before the image
    assert not ask(PROMPT, pixels[1:].numpy()).timings["prefix_reused"]  # another image (evicts the first)
    assert not ask(PROMPT, px).timings["prefix_reused"] and rt.encodes == 3  # evicted: encoded again


def test_pixels_of_another_shape_are_refused_before_compute(tiny_student, pixels):
    rt = Counting(tiny_student)
    with pytest.raises(DataError, match=r"\(1, 3, 48, 48\)"):
        generate(rt, PROMPT, pixels[:1, :, :40, :40].numpy(), 5, eos_id=-1, image_size=48)
    with pytest.raises(DataError, match="preprocess"):
        generate(rt, PROMPT, pixels.numpy(), 5, eos_id=-1, image_size=48)  # a batch of two
    assert rt.encodes == 0


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    from alignkd.export.exporter import export_bundle

    out = tmp_path_factory.mktemp("b") / "bundle"
    export_bundle(ckpt, out, ["onnx", "gguf"], ["fp32"], target="desktop", log=lambda *_: None)
    return out


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_every_runtime_continues_after_a_kept_prefix(bundle, tiny_student, fmt):
    """decode below what the cache holds drops the positions from there on (each runtime's own way): a
    follow-up through the emulator gives the tokens of a fresh runtime asked only that question."""
    from alignkd.export.emulator import BundleRunner

    img = load_image(_first_image())
    runner, fresh = (BundleRunner(bundle, fmt, "fp32", threads=1) for _ in range(2))
    try:
        runner.answer(img, "What shape is it?", max_new_tokens=6)
        again = runner.answer(img, "What color is the shape?", max_new_tokens=6)
        want = fresh.answer(img, "What color is the shape?", max_new_tokens=6)
        assert again.generation.timings["prefix_reused"] and not want.generation.timings["prefix_reused"]
        assert again.tokens == want.tokens
        np.testing.assert_allclose(again.generation.prompt_logits, want.generation.prompt_logits, rtol=1e-4, atol=1e-4)
    finally:
        runner.close()
        fresh.close()


def _first_image():
    from alignkd.data import easyvqa

    return easyvqa.first_test_image()


def test_emulator_caches_image_tokens_and_preprocesses_any_size(bundle, tiny_student):
    from alignkd.export.emulator import BundleRunner

    runner = BundleRunner(bundle, "onnx", "fp32", threads=1, image_cache_size=1)
    try:
        cfg = image_config(tiny_student.config)
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((70, 30), (90, 200))]
        for img in images:  # other sizes than the bundle's 48 px: the one preprocessing path, never mis-shaped
            np.testing.assert_array_equal(runner.pixels(img), preprocess(img, cfg)[None].numpy())
            assert runner.pixels(img).shape == (1, 3, 48, 48)
        first = runner.answer(images[0], "What shape is it?", max_new_tokens=3)
        again = runner.answer(images[0], "What color is it?", max_new_tokens=3)  # a follow-up on the same image
        assert not first.generation.timings["image_cached"] and again.generation.timings["image_cached"]
        runner.answer(images[1], "What shape is it?", max_new_tokens=3)  # capacity 1: evicts the first image
        assert not runner.answer(images[0], "What shape is it?", max_new_tokens=3).generation.timings["image_cached"]
        want = generate(EagerRuntime(tiny_student), runner.prompt_ids("What shape is it?"),
                        preprocess(images[0], cfg)[None].numpy(), 3, runner.eos_ids[0]).tokens
        assert first.tokens == want
    finally:
        runner.close()


def test_emulator_refuses_a_preprocessing_of_another_size(bundle, tmp_path):
    from alignkd.export.bundle import write_manifest, read_manifest
    from alignkd.export.emulator import BundleRunner

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    pre = json.loads((b / "preprocessing.json").read_text())
    (b / "preprocessing.json").write_text(json.dumps({**pre, "image_size": 40}))
    manifest = read_manifest(bundle)
    write_manifest(b, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "created_by", "files")})
    with pytest.raises(DataError, match="preprocessing image_size 40 != model image_size 48"):
        BundleRunner(b, "onnx")
