"""The trainer: exact resume, divergence stop, atomic checkpoints, optimizer contents, step variants."""

from __future__ import annotations

import json

import pytest
import torch

from alignkd.errors import ConfigError
from alignkd.model import load_model, save_model
from alignkd.train.recipe import TrainingDiverged, latest_checkpoint, setup, train, train_step


def test_resume_logs_the_same_losses_as_an_uninterrupted_run(tmp_path, small_run, capsys):
    full = small_run(output_dir=str(tmp_path / "full"), save_every=2)
    train(full)
    killed = small_run(output_dir=str(tmp_path / "killed"), save_every=2)
    assert train(killed, stop_after=3) == {"stopped_at": 3}  # "killed" after step 3; checkpoint at step 2
    assert latest_checkpoint(tmp_path / "killed").name == "step-000002"
    capsys.readouterr()
    train(killed)  # resumes from step 2
    said = capsys.readouterr().err.splitlines()
    assert said == [f"resuming from {tmp_path / 'killed' / 'train' / 'checkpoints' / 'step-000002'} (step 2 of 4)"]
    a = [json.loads(x) for x in (tmp_path / "full" / "train" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "killed" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for k in ("ce", "kd", "att", "v_all", "v_focus", "total", "lr"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["step"], k)
    # the final students are the same
    sa, sb = load_model(tmp_path / "full").state_dict(), load_model(tmp_path / "killed").state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    assert (tmp_path / "full" / "train" / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / "full" / "train" / "adapters.safetensors").is_file()


def test_adapters_are_trained_in_the_paper_variant_and_frozen_in_release(tmp_path, small_run):
    run = setup(small_run())
    opt_params = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    adapters = list(run.loss_fn.parameters())
    assert adapters and all(id(p) in opt_params for p in adapters)
    assert not any(id(p) in opt_params for p in run.student.vision_tower.parameters())
    before = [p.detach().clone() for p in adapters]
    train_step(run)
    assert all(not torch.equal(a, p) for a, p in zip(before, adapters))
    assert run.shared_vision is False  # tiny-teacher preset has its own random CLIP
    rel = setup(small_run(loss__variant="release", output_dir=str(tmp_path / "rel")))
    opt_params = {id(p) for g in rel.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in rel.loss_fn.parameters())


def test_a_shared_clip_runs_once_for_both_and_gives_the_terms_of_two(tmp_path, small_run, monkeypatch):
    """Teacher and student with the same frozen CLIP (MobileVLM V2's, the demo's): the student's features feed
    the teacher's projector and the teacher's copy of the tower is never kept; the terms are those of a run
    where each model runs its own CLIP."""
    from alignkd.model import build_model
    from alignkd.train import recipe

    teacher = save_model(build_model("tiny-teacher", seed=1), tmp_path / "teacher")
    keys = {"teacher": str(teacher), "init_vision_from": str(teacher)}
    shared = setup(small_run(**keys, output_dir=str(tmp_path / "shared")))
    assert shared.shared_vision and shared.teacher.vision_tower is None
    monkeypatch.setattr(recipe, "_same_vision_tower", lambda a, b: False)
    apart = setup(small_run(**keys, output_dir=str(tmp_path / "apart")))
    assert not apart.shared_vision and apart.teacher.vision_tower is not None
    for _ in range(2):
        a, b = train_step(apart), train_step(shared)
        for k in ("ce", "kd", "att", "v_all", "v_focus", "total", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-8), k
        assert a["kd"] > 0 and a["att"] > 0 and a["v_focus"] > 0


def test_baseline_has_no_teacher_terms(small_run):
    run = setup(small_run(method="baseline", teacher=None))
    row = train_step(run)
    assert run.teacher is None and row["kd"] == row["att"] == row["v_all"] == 0.0 and row["total"] == row["ce"]


def test_nan_stops_naming_the_term_and_keeps_the_last_checkpoint(tmp_path, small_run):
    cfg = small_run(method="baseline", teacher=None, save_every=1, steps=3)
    train(cfg, stop_after=1)
    run = setup(cfg)  # resumes at step 1
    with torch.no_grad():
        run.student.lm.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="step 2: loss term\\(s\\) ce, total became NaN"):
        train_step(run)
    assert latest_checkpoint(tmp_path / "run").name == "step-000001"
    load_model(latest_checkpoint(tmp_path / "run"))  # still loadable


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch, small_run):
    import alignkd.model.checkpoint as ck

    cfg = small_run(method="baseline", teacher=None, save_every=1, steps=3)
    train(cfg, stop_after=1)

    def dies(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck, "_save_sharded", dies)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stop_after=1)
    root = tmp_path / "run" / "train" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-000001"]  # no half-written step-000002
    load_model(root / "step-000001")


def test_vocabulary_mismatch_is_refused(tmp_path, tiny_teacher, small_run):
    bad = tiny_teacher.config.replace(text=tiny_teacher.config.text.__class__(
        **{**tiny_teacher.config.text.__dict__, "vocab_size": 600}))
    from alignkd.model import MobileVLM

    save_model(MobileVLM(bad), tmp_path / "t600")
    with pytest.raises(ConfigError, match="vocabulary|tokenizer"):
        setup(small_run(teacher=str(tmp_path / "t600")))


def test_gradient_checkpointing_gives_the_same_step(tmp_path, small_run):
    """The layer-0 capture stays open through backward, where checkpointing recomputes layer 0."""
    rows = []
    for gc in (False, True):
        run = setup(small_run(output_dir=str(tmp_path / f"gc{gc}"), gradient_checkpointing=gc))
        rows.append((train_step(run), [p.detach().clone() for p in run.student.lm.parameters()]))
    (a, pa), (b, pb) = rows
    for k in ("ce", "kd", "att", "v_all", "v_focus", "total", "grad_norm"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(pa, pb, strict=True))


def test_attention_captures_from_the_text_after_the_image_give_the_same_step(tmp_path, small_run, monkeypatch):
    """The step captures layer-0 rows only from the first text after an image; every row gives the same terms."""
    from alignkd.train import recipe

    starts, first = [], recipe.first_text_after_image
    monkeypatch.setattr(recipe, "first_text_after_image", lambda *a: starts.append(first(*a)) or starts[-1])
    rows = []
    for everything in (False, True):
        run = setup(small_run(output_dir=str(tmp_path / f"all{everything}")))
        if everything:
            monkeypatch.setattr(recipe, "first_text_after_image", lambda *a: 0)
        rows.append(train_step(run))
    assert starts and min(starts) > 144  # the captures did skip the system prompt and the 144 vision rows
    for k in ("ce", "kd", "att", "v_all", "v_focus", "total", "grad_norm"):
        assert rows[0][k] == pytest.approx(rows[1][k], rel=1e-5), k


@pytest.mark.slow  # inductor compiles the tiny blocks: ~1 min on 2 cores
def test_compile_gives_the_same_step_and_keeps_layer0_eager(tmp_path, small_run):
    rows = []
    for compiled in (False, True):
        run = setup(small_run(output_dir=str(tmp_path / f"c{compiled}"), compile=compiled))
        rows.append((train_step(run), train_step(run), run))
    (a1, a2, _), (b1, b2, run) = rows
    layers = run.student.lm.model.layers
    assert layers[0]._compiled_call_impl is None and all(l._compiled_call_impl is not None for l in layers[1:])
    assert run.teacher.lm.model.layers[1]._compiled_call_impl is not None
    assert "lm.model.layers.1.self_attn.q_proj.weight" in run.student.state_dict()  # names unchanged
    for a, b in ((a1, b1), (a2, b2)):
        for k in ("ce", "kd", "att", "v_all", "v_focus", "total", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k


def test_deterministic_switches_torch_to_deterministic_kernels(small_run):
    before = torch.are_deterministic_algorithms_enabled()
    try:
        setup(small_run(deterministic=True, method="baseline", teacher=None))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_data_loader_workers_give_the_same_steps(tmp_path, small_run):
    """num_workers decodes the images in other processes; the batches, hence the losses, are the same."""
    rows = []
    for workers in (0, 2):
        run = setup(small_run(output_dir=str(tmp_path / f"w{workers}"), num_workers=workers))
        rows.append([train_step(run) for _ in range(2)])
    for a, b in zip(*rows, strict=True):
        for k in ("ce", "kd", "att", "v_all", "v_focus", "total", "grad_norm"):
            assert a[k] == b[k], k


def test_vision_feature_memo_gives_the_same_steps_and_computes_each_image_once(tmp_path, small_run, monkeypatch):
    """Four samples, batch 2: the second epoch's images come from the memo, and every step's terms are the
    fresh forward's."""
    from alignkd.model import vision

    monkeypatch.setattr(vision, "_MEMOS", {})
    rows = []
    for memo in (0.0, 0.01):
        run = setup(small_run(output_dir=str(tmp_path / f"m{memo}"), data__limit=4, vision_feature_memo_gb=memo))
        rows.append([train_step(run) for _ in range(4)])
    kept = run.student.vision_tower.memo
    distinct = len({s["image"] for s in run.dataset.samples})
    assert (kept.misses, kept.hits, len(kept.store)) == (distinct, 8 - distinct, distinct)
    for a, b in zip(*rows, strict=True):
        for k in ("ce", "kd", "att", "v_all", "v_focus", "total", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k


def test_a_run_without_matplotlib_ends_complete_with_one_warning(tmp_path, small_run, capsys, monkeypatch):
    # a GPU image built by hand may lack the plotting package: the trained student must not end in a traceback
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # import fails
    out = tmp_path / "run"
    train(small_run(output_dir=str(out)))
    assert (out / "model.safetensors").is_file() and (out / "train" / "summary.json").is_file()
    assert not (out / "train" / "loss_curve.png").exists()
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"warning: matplotlib is not installed: {out / 'train' / 'loss_curve.png'} is not drawn")
