"""The training config: nested groups from YAML and key=value, every bad value one ConfigError naming the
key before anything loads, the keys listed with their docs, the shipped configs, what a resume must match."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alignkd.demo import DemoConfig
from alignkd.distill import AlignKDLossConfig
from alignkd.errors import ConfigError
from alignkd.train.config import TrainConfig, _read_yaml, config_keys, load_config, run_differences
from alignkd.train.recipe import loss_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_yaml_groups_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("method: logit-kd\nteacher: t\nsteps: 10\nlr: 3.0e-4\ndata:\n  path: d.json\n  limit: 5\n"
                 "loss:\n  temperature: 2\n")
    cfg = load_config(y, ["steps=20", "lr=1e-4", "gradient_checkpointing=true", "loss.kd_positions=all",
                          "data.limit=7"], flags={"method": "alignkd"})
    assert (cfg.method, cfg.teacher, cfg.steps, cfg.lr, cfg.gradient_checkpointing) == ("alignkd", "t", 20, 1e-4, True)
    assert cfg.loss == AlignKDLossConfig(temperature=2.0, kd_positions="all")
    assert (cfg.data.path, cfg.data.limit, cfg.data.template) == ("d.json", 7, "v1")
    # YAML ← options (flags) ← key=value
    assert load_config(y, ["method=baseline"], flags={"method": "alignkd"}).method == "baseline"
    assert load_config(y, flags={"method": "baseline"}).method == "baseline"


@pytest.mark.parametrize("overrides, message", [
    (["teacher_dtype=banana"], "teacher_dtype must be one of auto, bf16, fp16, fp32, got 'banana'"),
    (["lr=-1"], "lr must be > 0, got -1.0"),
    (["lr=nan"], "lr must be a finite number"),
    (["warmup_ratio=1.5"], "warmup_ratio must be between 0 and 1"),
    (["keep_last=0"], "keep_last must be > 0"),
    (["save_every=-2"], "save_every must be >= 0"),
    (["num_workers=-1"], "num_workers must be >= 0"),
    (["vision_feature_memo_gb=-1"], "vision_feature_memo_gb must be >= 0"),
    (["vision_feature_memo_gb=1", "train_vision_tower=true"], "vision_feature_memo_gb needs a frozen vision tower"),
    (["steps=ten"], "steps: 'ten' is not an integer$"),
    (["projector_lr=x"], "projector_lr: 'x' is not a number or null$"),
    (["compile=2"], "compile: '2' is not true or false$"),
    (["loss.variant=x"], "loss: variant must be one of paper, release, got 'x'"),
    (["loss.kd_positions=answers"], "loss: kd_positions must be one of text, tokens, all"),
    (["loss.temperature=0"], "loss: temperature must be > 0"),
    # bounds whose excess only costs: T² overflowed at step 1, a 10**12 batch never reached it, seeds past 64 bits
    # crashed torch.manual_seed, 300 workers were forked for a 4-sample run
    (["loss.temperature=1e200"], r"loss: temperature must be > 0 and at most 10000 .*, got 1e\+200"),
    (["batch_size=1000000000000"], "batch_size must be at most 65536, got 1000000000000"),
    (["grad_accum=65537"], "grad_accum must be at most 65536"),
    (["seed=18446744073709551616"], "seed must be at most 4294967295"),
    ([f"steps={10**400}"], r"steps must be at most 1000000000, got 10{17}\.\.\.0{19}$"),  # overflowed the warmup
    ([f"seed={'9' * 5000}"], "seed: a value of 5000 characters is beyond any setting"),  # Python's int-string limit
    (["seed=2026-13-45"], "seed: '2026-13-45' is not an integer"),  # no date: the text as typed
    ([f"num_workers={4 * (os.cpu_count() or 1) + 1}"], "num_workers must be at most"),
    (["data.template=chatml"], "data: template must be one of"),
    (["data.on_malformed=ignore"], "data: on_malformed must be one of fail, skip"),
    (["data.limit=0"], "data: limit must be > 0"),
    (["stepz=3"], r"unknown config key\(s\) stepz;"),
    (["temperature=2"], r"temperature \(did you mean loss.temperature\?\)"),
    (["loss=2"], "loss is a group of keys .*loss.temperature.*: set them as loss.KEY=VALUE"),
    (["loss.nope=1"], r"unknown config key\(s\) loss.nope"),
    (["method=alignkd"], "method alignkd needs a teacher"),
    (["steps"], "override 'steps' is not key=value"),
    (["method="], "method is empty: it needs a string$"),
    (["steps= "], "steps is empty: it needs an integer$"),
    ([".steps=1"], r"config key '\.steps' is not a key: KEY or GROUP\.KEY"),
    (["=1"], "config key '' is not a key"),
    (["data..path=x"], r"config key 'data\.\.path' is not a key"),
])
def test_every_bad_value_is_one_error_naming_the_key(overrides, message):
    teacher = [] if overrides == ["method=alignkd"] else ["teacher=t"]
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, teacher + overrides)
    assert "\n" not in str(e.value) and "<class" not in str(e.value)


def test_bad_config_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nlr: [1, 2\nseed: 0\n")
    cases = {bad: r"bad.yaml is not valid YAML at line \d+, column \d+: ", tmp_path: "is a directory",
             tmp_path / "none.yaml": "not found", tmp_path / "latin.yaml": "is not UTF-8 text",
             tmp_path / "list.yaml": "expected a mapping of config keys, got list"}
    (tmp_path / "latin.yaml").write_bytes("method: caf\xe9\n".encode("latin-1"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "digits.yaml").write_text(f"steps: {'9' * 5000}\n")
    cases[tmp_path / "digits.yaml"] = "digits.yaml: holds an integer of over 4,300 digits"
    (tmp_path / "date.yaml").write_text("method: baseline\nseed: 2026-13-45\n")  # YAML reads a date: month 13
    cases[tmp_path / "date.yaml"] = "date.yaml: a value cannot be read: month must be in 1..12"
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message) as e:
            load_config(path)
        assert "\n" not in str(e.value), str(e.value)


def test_a_key_set_twice_in_a_config_file_is_refused_but_a_merge_may_be_overridden(tmp_path):
    """PyYAML keeps the later of two equal keys without a word: the run would train with one of two values."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("steps: 3\nloss:\n  kd_weight: 1\n  kd_weight: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML at line 4, column 3: key 'kd_weight' appears "
                                          r"twice \(first at line 3\)"):
        load_config(twice)
    merged = tmp_path / "merged.yaml"  # YAML's own override: a merged-in default replaced by a key of the mapping
    merged.write_text("defaults: &d {kd_weight: 1, att_weight: 3}\nloss:\n  <<: *d\n  kd_weight: 2\n")
    assert _read_yaml(merged)["loss"] == {"kd_weight": 2, "att_weight": 3}


def test_keys_are_listed_with_groups_and_a_doc_each():
    keys = {k: (default, doc) for k, default, doc in config_keys(TrainConfig)}
    assert keys["loss.temperature"][0] == 1.0 and "temperature" in keys["loss.temperature"][1]
    assert keys["data.limit"] == (None, "Use only this many samples (a seeded choice); None = all.")
    assert "loss" not in keys and "data" not in keys and "num_workers" in keys
    assert all(doc for doc in (d for _, d in keys.values()))
    assert all(doc for _, _, doc in config_keys(DemoConfig))


def test_the_method_picks_the_loss_terms():
    cfg = load_config(None, ["teacher=t", "loss.kd_weight=2", "loss.att_weight=3"])
    assert (loss_config(cfg).kd_weight, loss_config(cfg).att_weight, loss_config(cfg).v_weight) == (2.0, 3.0, 1.0)
    kd = loss_config(cfg.replace(method="logit-kd"))
    assert (kd.kd_weight, kd.att_weight, kd.v_weight) == (2.0, 0.0, 0.0)
    base = loss_config(cfg.replace(method="baseline"))
    assert (base.kd_weight, base.att_weight, base.v_weight) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_load_and_validate(path):
    if path.name == "easyvqa_demo.yaml":
        assert load_config(path, cls=DemoConfig) == DemoConfig()  # the demo as `train` runs it
        return
    cfg = load_config(path)
    assert cfg.student.endswith("MobileVLM_V2-1.7B") and cfg.data.path.endswith("llava_v1_5_mix665k.json")
    assert cfg.method == {"alignkd.yaml": "alignkd", "logit_kd.yaml": "logit-kd", "baseline.yaml": "baseline"}[path.name]
    assert cfg.teacher == (None if cfg.method == "baseline" else "ckpt/MobileVLM_V2-7B")
    assert cfg.batch_size * cfg.grad_accum * 8 == 128 and cfg.loss == AlignKDLossConfig()


def test_shipped_real_configs_differ_only_in_the_method_and_its_terms():
    runs = {p.stem: load_config(p) for p in (CONFIGS / "mobilevlm_v2_1.7b").glob("*.yaml")}
    ref = runs["alignkd"]
    for name, cfg in runs.items():
        assert run_differences(ref.to_dict(), cfg.replace(method="alignkd", teacher=ref.teacher)) == [], name


def test_run_differences_name_what_changes_the_run():
    cfg = load_config(None, ["teacher=t", "steps=10"])
    rec = cfg.to_dict()
    # how a run is executed or reported does not make it another run
    assert run_differences(rec, cfg.replace(output_dir="elsewhere", compile=True, save_every=3, progress=False)) == []
    assert run_differences(rec, cfg.replace(steps=20)) == ["steps: 10 → 20"]
    assert run_differences(rec, cfg.replace(method="logit-kd")) == ["method: 'alignkd' → 'logit-kd'"]
    assert run_differences(rec, cfg.replace(save_every=3), also=("save_every",)) == ["save_every: 0 → 3"]
    other = load_config(None, ["teacher=t", "steps=10", "loss.temperature=2"])
    assert run_differences(rec, other) == ["loss.temperature: 1.0 → 2.0"]
    # a baseline ignores the teacher and the loss group
    base = load_config(None, ["method=baseline", "steps=10"])
    assert run_differences(base.to_dict(), base.replace(teacher="t", loss=AlignKDLossConfig(temperature=3.0))) == []
    assert "not one this version reads" in run_differences({"temperature": 1.0}, cfg)[0]


def test_runs_are_compared_by_where_their_files_are_not_how_they_were_named(tmp_path, monkeypatch):
    from alignkd.train.config import with_absolute_paths

    for d in ("a", "b"):
        (tmp_path / d / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    cfg = load_config(None, ["method=baseline", "data.path=data/train.json", "data.image_folder=data"])
    recorded = with_absolute_paths(cfg).to_dict()  # as the run's checkpoints record it
    assert recorded["data"]["path"] == str(tmp_path / "a" / "data" / "train.json") and recorded["student"] == "tiny-student"
    absolute = load_config(None, ["method=baseline", f"data.path={tmp_path}/a/data/train.json",
                                  f"data.image_folder={tmp_path}/a/data"])
    assert run_differences(recorded, absolute) == []  # the same files named absolutely: the same run
    monkeypatch.chdir(tmp_path / "b")  # the same relative names from another folder: other files, another run
    assert run_differences(recorded, cfg) == [
        f"data.path: '{tmp_path}/a/data/train.json' → '{tmp_path}/b/data/train.json'",
        f"data.image_folder: '{tmp_path}/a/data' → '{tmp_path}/b/data'"]
    assert load_config(None, ["method=baseline"]).data.path == "easyvqa"


def test_a_home_folder_in_a_config_is_the_users_and_a_bare_tilde_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    f = tmp_path / "c.yaml"
    f.write_text("method: baseline\noutput_dir: ~/runs/a\ndata:\n  path: ~/d.json\n")
    cfg = load_config(f)
    assert (cfg.output_dir, cfg.data.path) == (f"{tmp_path}/runs/a", f"{tmp_path}/d.json")  # not a folder named ~
    f.write_text("method: baseline\noutput_dir: ~\n")
    with pytest.raises(ConfigError, match=r"^output_dir has no value \(YAML reads ~, null and nothing as none\): it "
                                          r"needs a string; quote '~/...' for a path in the home folder$"):
        load_config(f)
