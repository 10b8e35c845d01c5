"""The trainer: config handling, exact resume, divergence stop, atomic checkpoints, optimizer contents."""

from __future__ import annotations

import json

import pytest
import torch

from alignkd.errors import ConfigError
from alignkd.model import load_model, save_model
from alignkd.train.config import TrainConfig, load_config
from alignkd.train.recipe import TrainingDiverged, latest_checkpoint, setup, train, train_step


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(method="alignkd", teacher="tiny-teacher", steps=4, batch_size=2, train_limit=24, lr=1e-3,
                output_dir=str(tmp_path / "run"), progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("method: logit-kd\nteacher: t\nsteps: 10\nlr: 3.0e-4\n")
    cfg = load_config(y, ["steps=20", "lr=1e-4", "gradient_checkpointing=true", "kd_positions=all"])
    assert (cfg.method, cfg.teacher, cfg.steps, cfg.lr, cfg.gradient_checkpointing, cfg.kd_positions) == (
        "logit-kd", "t", 20, 1e-4, True, "all")
    with pytest.raises(ConfigError, match="unknown config key.*stepz"):
        load_config(None, ["stepz=3"])
    with pytest.raises(ConfigError, match="steps: 'ten' is not a valid"):
        load_config(None, ["steps=ten"])
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config(None, ["method=alignkd"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        y.write_text("a: [")
        load_config(y)


def test_resume_logs_the_same_losses_as_an_uninterrupted_run(tmp_path):
    full = _cfg(tmp_path, output_dir=str(tmp_path / "full"), save_every=2)
    train(full)
    killed = _cfg(tmp_path, output_dir=str(tmp_path / "killed"), save_every=2)
    assert train(killed, stop_after=3) == {"stopped_at": 3}  # "killed" after step 3; checkpoint at step 2
    assert latest_checkpoint(tmp_path / "killed").name == "step-000002"
    train(killed)  # resumes from step 2
    a = [json.loads(x) for x in (tmp_path / "full" / "train" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "killed" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("ce", "kd", "att", "v_all", "v_focus", "total", "lr"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["step"], k)
    # the final students are the same
    sa, sb = load_model(tmp_path / "full").state_dict(), load_model(tmp_path / "killed").state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    assert (tmp_path / "full" / "train" / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / "full" / "train" / "adapters.safetensors").is_file()


def test_adapters_are_trained_in_the_paper_variant_and_frozen_in_release(tmp_path):
    run = setup(_cfg(tmp_path))
    opt_params = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    adapters = list(run.loss_fn.parameters())
    assert adapters and all(id(p) in opt_params for p in adapters)
    assert not any(id(p) in opt_params for p in run.student.vision_tower.parameters())
    before = [p.detach().clone() for p in adapters]
    train_step(run)
    assert all(not torch.equal(a, p) for a, p in zip(before, adapters))
    assert run.shared_vision is False  # tiny-teacher preset has its own random CLIP
    rel = setup(_cfg(tmp_path, variant="release", output_dir=str(tmp_path / "rel")))
    opt_params = {id(p) for g in rel.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in rel.loss_fn.parameters())


def test_baseline_has_no_teacher_terms(tmp_path):
    run = setup(_cfg(tmp_path, method="baseline", teacher=None))
    row = train_step(run)
    assert run.teacher is None and row["kd"] == row["att"] == row["v_all"] == 0.0 and row["total"] == row["ce"]


def test_nan_stops_naming_the_term_and_keeps_the_last_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, method="baseline", teacher=None, save_every=1, steps=3)
    train(cfg, stop_after=1)
    run = setup(cfg)  # resumes at step 1
    with torch.no_grad():
        run.student.lm.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="step 2: loss term\\(s\\) ce, total became NaN"):
        train_step(run)
    assert latest_checkpoint(tmp_path / "run").name == "step-000001"
    load_model(latest_checkpoint(tmp_path / "run"))  # still loadable


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    import alignkd.model.checkpoint as ck

    cfg = _cfg(tmp_path, method="baseline", teacher=None, save_every=1, steps=3)
    train(cfg, stop_after=1)

    def dies(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck, "_save_sharded", dies)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stop_after=1)
    root = tmp_path / "run" / "train" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-000001"]  # no half-written step-000002
    load_model(root / "step-000001")


def test_vocabulary_mismatch_is_refused(tmp_path, tiny_teacher):
    bad = tiny_teacher.config.replace(text=tiny_teacher.config.text.__class__(
        **{**tiny_teacher.config.text.__dict__, "vocab_size": 600}))
    from alignkd.model import MobileVLM

    save_model(MobileVLM(bad), tmp_path / "t600")
    with pytest.raises(ConfigError, match="vocabulary|tokenizer"):
        setup(_cfg(tmp_path, teacher=str(tmp_path / "t600")))


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    """The layer-0 capture stays open through backward, where checkpointing recomputes layer 0."""
    rows = []
    for gc in (False, True):
        run = setup(_cfg(tmp_path, output_dir=str(tmp_path / f"gc{gc}"), gradient_checkpointing=gc))
        rows.append((train_step(run), [p.detach().clone() for p in run.student.lm.parameters()]))
    (a, pa), (b, pb) = rows
    for k in ("ce", "kd", "att", "v_all", "v_focus", "total", "grad_norm"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(pa, pb))


@pytest.mark.slow  # inductor compiles the tiny blocks: ~1 min on 2 cores
def test_compile_gives_the_same_step_and_keeps_layer0_eager(tmp_path):
    rows = []
    for compiled in (False, True):
        run = setup(_cfg(tmp_path, output_dir=str(tmp_path / f"c{compiled}"), compile=compiled))
        rows.append((train_step(run), train_step(run), run))
    (a1, a2, _), (b1, b2, run) = rows
    layers = run.student.lm.model.layers
    assert layers[0]._compiled_call_impl is None and all(l._compiled_call_impl is not None for l in layers[1:])
    assert run.teacher.lm.model.layers[1]._compiled_call_impl is not None
    assert "lm.model.layers.1.self_attn.q_proj.weight" in run.student.state_dict()  # names unchanged
    for a, b in ((a1, b1), (a2, b2)):
        for k in ("ce", "kd", "att", "v_all", "v_focus", "total", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k


def test_deterministic_switches_torch_to_deterministic_kernels(tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    try:
        setup(_cfg(tmp_path, deterministic=True, method="baseline", teacher=None))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
