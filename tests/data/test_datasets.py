"""LLaVA-format JSON + image folder: samples, templates, and every bad entry counted or named."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from alignkd.data.datasets import collate, easyvqa_dataset, llava_json_dataset
from alignkd.data.image import image_config
from alignkd.errors import DataError
from alignkd.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, get_preset

CFG = image_config(get_preset("tiny-student"))


def _write(tmp_path, entries):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "imgs" / "red.png")
    p = tmp_path / "data.json"
    p.write_text(json.dumps(entries))
    return p


GOOD = {"id": "a", "image": "red.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Is it a circle?"}, {"from": "gpt", "value": "no"}]}
TEXT_ONLY = {"id": "b", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}


def test_v1_samples_and_collate(tmp_path, tok):
    ds = llava_json_dataset(_write(tmp_path, [GOOD, TEXT_ONLY]), tmp_path / "imgs", tok, "v1", CFG, max_length=512)
    assert len(ds) == 2 and ds.stats.n_entries == 2
    a, b = ds[0], ds[1]
    assert a["input_ids"].count(IMAGE_TOKEN_INDEX) == 1 and a["pixel_values"].shape == (3, 48, 48)
    assert b["pixel_values"] is None
    trained = [t for t, lab in zip(a["input_ids"], a["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "red</s> no</s>"  # only the two answers (+ EOS) train
    batch = collate([a, b], pad_id=0)
    assert batch["pixel_values"].shape == (1, 3, 48, 48)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][1].sum() == len(b["input_ids"])


def test_plain_template_trains_the_caption(tmp_path, tok):
    entry = {"id": "c", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red square"}]}
    ds = llava_json_dataset(_write(tmp_path, [entry]), tmp_path / "imgs", tok, "plain", CFG, max_length=512)
    ex = ds[0]
    assert ex["input_ids"][:2] == [1, IMAGE_TOKEN_INDEX]
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "a red square\n"


def test_a_lone_surrogate_is_a_bad_sample_naming_it(tmp_path, tok):
    """JSON's "\\ud800" escape decodes to text no tokenizer takes (a TypeError deep in tokenizers before)."""
    odd = {"id": "s", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nwhat \ud800?"},
                                                            {"from": "gpt", "value": "red"}]}
    data = _write(tmp_path, [GOOD, odd])
    with pytest.raises(DataError, match=r"data.json: sample 1: text .* is not valid Unicode: a lone surrogate"):
        llava_json_dataset(data, tmp_path / "imgs", tok, "v1", CFG, max_length=512)


def test_bad_entries_fail_with_their_index_or_are_skipped_and_counted(tmp_path, tok):
    bad_turns = {"id": "d", "image": "red.png", "conversations": [{"from": "human", "value": "no image token"},
                                                                   {"from": "gpt", "value": "x"}]}
    missing_img = {"id": "e", "image": "nope.png", "conversations": GOOD["conversations"]}
    not_a_dict = ["just", "a", "list"]
    data = _write(tmp_path, [GOOD, bad_turns, missing_img, not_a_dict])
    with pytest.raises(DataError, match=r"data.json: sample 1: .*<image>.*on_malformed=skip"):
        llava_json_dataset(data, tmp_path / "imgs", tok, "v1", CFG, max_length=512)
    ds = llava_json_dataset(data, tmp_path / "imgs", tok, "v1", CFG, max_length=512, on_malformed="skip")
    assert len(ds) == 1 and ds.stats.n_malformed == 3
    assert any("nope.png not found" in m for m in ds.stats.examples)


def test_too_long_samples_are_dropped_and_counted(tmp_path, tok):
    ds = llava_json_dataset(_write(tmp_path, [GOOD, TEXT_ONLY]), tmp_path / "imgs", tok, "v1", CFG, max_length=150)
    assert len(ds) == 1 and ds.stats.n_too_long == 1  # the image sample needs > 144 + text positions


def test_a_dataset_with_no_sample_left_is_an_error_naming_max_length(tmp_path, tok):
    """easy-vqa with max_length below every sample: a ZeroDivisionError in train, an empty cache in teacher-cache."""
    with pytest.raises(DataError, match=r"data.json: no usable sample \(2 over max_length 20, 0 malformed\)"):
        llava_json_dataset(_write(tmp_path, [GOOD, TEXT_ONLY]), tmp_path / "imgs", tok, "v1", CFG, max_length=20)
    with pytest.raises(DataError, match=r"^easy-vqa: no usable sample \(4 over max_length 20, 0 malformed\)$"):
        easyvqa_dataset("train", tok, CFG, max_length=20, limit=4)


def test_unreadable_json_and_corrupt_image(tmp_path, tok):
    p = tmp_path / "x.json"
    p.write_text("[{")
    with pytest.raises(DataError, match="x.json is not valid JSON"):
        llava_json_dataset(p, tmp_path, tok, "v1", CFG, max_length=512)
    ds = llava_json_dataset(_write(tmp_path, [GOOD]), tmp_path / "imgs", tok, "v1", CFG, max_length=512)
    (tmp_path / "imgs" / "red.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="red.png"):
        ds[0]


def test_images_are_checked_when_the_dataset_is_built(tmp_path, tok):
    """A corrupt, truncated, missing or non-image file fails (naming it) or is skipped before any batch."""
    _write(tmp_path, [GOOD])
    png = (tmp_path / "imgs" / "red.png").read_bytes()
    bad = {"garbage.png": "is corrupt or truncated", "cut.png": "is corrupt or truncated",
           "text.png": "is not in an image format PIL reads", "folder.png": "is a directory", "absent.png": "not found"}
    for name, data in [("garbage.png", b"\x89PNG\r\n\x1a\n garbage"), ("cut.png", png[: len(png) // 2]),
                       ("text.png", b"hello")]:
        (tmp_path / "imgs" / name).write_bytes(data)
    (tmp_path / "imgs" / "folder.png").mkdir()
    for name, why in bad.items():
        data = _write(tmp_path, [GOOD, {**GOOD, "image": name}])
        with pytest.raises(DataError, match=rf"data.json: sample 1: image .*{name} {why}.*on_malformed=skip") as e:
            llava_json_dataset(data, tmp_path / "imgs", tok, "v1", CFG, max_length=512)
        assert "<_io." not in str(e.value)
    data = _write(tmp_path, [GOOD] + [{**GOOD, "image": name} for name in bad])
    ds = llava_json_dataset(data, tmp_path / "imgs", tok, "v1", CFG, max_length=512, on_malformed="skip")
    assert len(ds) == 1 and ds.stats.n_malformed == 5


@pytest.mark.parametrize("image, kind", [(3, "a number"), (["a.png", "b.png"], "a list"), ("", '""'),
                                         ({"path": "a.png"}, "an object")])
def test_an_image_field_that_is_not_a_file_name_is_named(tmp_path, tok, image, kind):
    data = _write(tmp_path, [GOOD, {**GOOD, "image": image}])
    with pytest.raises(DataError, match=f"sample 1: 'image' must be one file name \\(a non-empty string\\), got {kind}") as e:
        llava_json_dataset(data, tmp_path / "imgs", tok, "v1", CFG, max_length=512)
    assert "<class" not in str(e.value)


def test_unreadable_data_files_are_one_error(tmp_path, tok):
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    for path, why in [(tmp_path, "is a directory, not a LLaVA-format JSON file"), (latin, "is not UTF-8 text"),
                      (tmp_path / "none.json", "not found")]:
        with pytest.raises(DataError, match=why):
            llava_json_dataset(path, tmp_path, tok, "v1", CFG, max_length=512)
    with pytest.raises(DataError, match="image folder .*nowhere is not a directory"):
        llava_json_dataset(_write(tmp_path, [GOOD]), tmp_path / "nowhere", tok, "v1", CFG, max_length=512)
