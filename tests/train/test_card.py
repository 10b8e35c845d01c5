"""The trained student's model card (README.md): what it says comes from the run, and the folder still loads."""

from __future__ import annotations

import copy
import json
import re

import yaml

from alignkd.model import load_model
from alignkd.train.card import model_card
from alignkd.train.recipe import train


def _front_matter(card: str) -> dict:
    m = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1))


def _table(card: str, header_first: str) -> dict[str, str]:
    """The Markdown table whose header starts with `header_first`: {column: value} of its one row, or
    {first cell: second cell} of a two-column table."""
    lines = card.splitlines()
    i = next(n for n, x in enumerate(lines) if x.startswith(f"| {header_first} |"))
    rows = []
    for x in lines[i + 2:]:
        if not x.startswith("|"):
            break
        rows.append([c.strip() for c in x.strip("|").split("|")])
    head = [c.strip() for c in lines[i].strip("|").split("|")]
    return dict(zip(head, rows[0])) if len(rows) == 1 and head[1] else {r[0]: r[1] for r in rows}


def test_a_run_writes_a_card_that_says_what_it_trained(tmp_path, small_run):
    out = tmp_path / "run"
    train(small_run())
    card = (out / "README.md").read_text(encoding="utf-8")
    summary = json.loads((out / "train" / "summary.json").read_text())
    front = _front_matter(card)
    assert front["pipeline_tag"] == "image-text-to-text" and "align-kd" in front["tags"]
    assert "base_model" not in front  # a preset, not a checkpoint folder
    assert "distilled with Align-KD" in card and "Teacher: tiny-teacher, the whole teacher online." in card
    losses = _table(card, "ce")
    assert set(losses) == {"ce", "kd", "att", "v_all", "v_focus", "total"}
    for k, v in losses.items():  # the last step's losses, as summary.json records them
        assert float(v) == round(summary["final"][k], 4), k
    rows = _table(card, "training")
    assert rows["steps"] == "4 × batch 2" and rows["data"] == "easyvqa, first 24 samples" and rows["seed"] == "0"
    assert f"alignkd-mobile eval {out} BASELINE_DIR --bench easyvqa" in card
    assert load_model(out).config.name == "tiny-student"  # the card does not disturb the checkpoint


def test_the_card_of_a_cached_run_and_of_a_checkpoint_folder(tmp_path, small_run):
    out = tmp_path / "run"
    train(small_run(steps=1))
    summary = json.loads((out / "train" / "summary.json").read_text())
    cached = copy.deepcopy(summary)
    cached["config"].update(teacher_cache="/caches/7b-k32", student=str(out))  # a local folder as the student
    card = model_card(cached, cache_k=32)
    assert "Teacher: tiny-teacher, its top-32 log-probs cached once (`teacher-cache`, /caches/7b-k32)" in card
    assert "1.0 × KD (T = 1.0, text positions, top-32 + rest)" in _table(card, "training")["loss"]
    assert "base_model" not in _front_matter(card) and "A MobileVLM V2 student (run)" in card  # not a Hub model
    released = out.parent / "MobileVLM_V2-1.7B"
    released.mkdir()
    assert _front_matter(model_card({**cached, "config": {**cached["config"], "student": str(released)}}))[
        "base_model"] == "mtgv/MobileVLM_V2-1.7B"
    assert "(`teacher-cache`, /caches/7b-k32); the teacher's layer 0 online." in card
    cached["config"]["method"] = "logit-kd"  # no teacher at all
    assert "(`teacher-cache`, /caches/7b-k32)." in model_card(cached, cache_k=32)
    baseline = copy.deepcopy(summary)
    baseline["config"]["method"] = "baseline"
    card = model_card(baseline)
    assert "Teacher:" not in card and "knowledge-distillation" not in _front_matter(card)["tags"]
    assert _table(card, "training")["loss"] == "CE"
