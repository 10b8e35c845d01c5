"""The easy-vqa demo (the CLI layer's `train`): answers keyed to the model that gave them, one held-out set
for every seed, finished runs reused, the student ablations."""

from __future__ import annotations

import json

import pytest

from alignkd.demo import STUDENTS, DemoConfig, run_demo, score, student_recipe, train_or_reuse
from alignkd.errors import ConfigError
from alignkd.eval.benchmarks import EasyVQA
from alignkd.eval.runner import answer_items
from alignkd.model import load_model
from alignkd.model.tokenizer import load_tokenizer
from alignkd.train.config import load_config
from alignkd.train.recipe import loss_config, train


def test_a_retrained_checkpoint_is_never_scored_with_the_previous_models_answers(tmp_path):
    cfg = load_config(flags={"method": "baseline", "steps": 2, "batch_size": 4, "data.limit": 16, "lr": 1e-3,
                             "output_dir": str(tmp_path / "ckpt"), "progress": False})
    bench = EasyVQA(seed=0)
    items, _ = bench.load(None, limit=12)
    train(cfg)
    score(tmp_path / "ckpt", items, bench, "first", progress=False)
    (first,) = (tmp_path / "ckpt" / "eval").glob("easyvqa-*.jsonl")
    # make the first model's answers perfect: scoring them again would give 100 %
    rows = [json.loads(x) for x in first.read_text().splitlines()]
    truth = {it.id: it.meta["answer"] for it in items}
    first.write_text("".join(json.dumps({**r, "text": truth[str(r["question_id"])]}) + "\n" for r in rows))
    assert score(tmp_path / "ckpt", items, bench, "first", progress=False) == 100.0  # the cache is used

    train(cfg.replace(seed=1, lr=3e-3, resume=False))  # another model into the same directory
    got = score(tmp_path / "ckpt", items, bench, "second", progress=False)
    model, tok = load_model(tmp_path / "ckpt"), load_tokenizer(tmp_path / "ckpt")
    fresh = answer_items(model, tok, items, batch_size=32, max_new_tokens=4, progress=False)  # no answer file
    assert got == bench.score(items, fresh)["accuracy"] < 100.0
    assert [p.name for p in (tmp_path / "ckpt" / "eval").iterdir()] != [first.name] and not first.exists()


def test_a_student_of_another_teacher_is_retrained_neither_reused_nor_resumed(tmp_path, capsys):
    cfg = load_config(flags={"method": "baseline", "steps": 2, "batch_size": 4, "data.limit": 16, "lr": 1e-3,
                             "save_every": 1, "output_dir": str(tmp_path / "student"), "progress": False})
    marker = tmp_path / "student" / "train" / "inputs.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"teacher": "aaaa"}))
    train(cfg, stop_after=1)  # killed after step 1, a student of teacher aaaa
    capsys.readouterr()
    train_or_reuse(cfg, {"teacher": "aaaa"})
    assert "resuming from" in capsys.readouterr().err  # same teacher: the checkpoint is resumed
    capsys.readouterr()
    done = train_or_reuse(cfg, {"teacher": "aaaa"})
    assert "reusing the finished run" in capsys.readouterr().out  # and the finished run reused
    # the same folder now names a retrained teacher: the student starts over
    again = train_or_reuse(cfg, {"teacher": "bbbb"})
    log = capsys.readouterr()
    assert "reusing" not in log.out and "resuming" not in log.err and "starting fresh" in log.err
    assert again["steps"] == 2 and done["steps"] == 2
    assert json.loads(marker.read_text()) == {"teacher": "bbbb"}
    train(cfg.replace(resume=False), stop_after=1)  # killed again, now without a marker of its teacher
    marker.unlink()
    train_or_reuse(cfg, {"teacher": "bbbb"})
    assert "starting fresh" in capsys.readouterr().err  # a checkpoint of an unknown teacher is not resumed


@pytest.mark.slow  # five tiny trainings on the whole easy-vqa split, three demos: ~40 s on 2 cores
def test_demo_end_to_end_one_held_out_set_for_every_seed_and_reuse(tmp_path, capsys):
    def demo(**kw):
        base = dict(output_dir=str(tmp_path / f"seed{kw.get('seed', 0)}"), teacher_steps=2, student_steps=2,
                    batch_size=4, eval_limit=10, progress=False, methods="baseline,kd-v")
        return run_demo(DemoConfig(**{**base, **kw}))

    s0 = demo()
    assert set(s0["methods"]) == {"baseline", "kd-v"} and s0["eval"]["questions"] == 10
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "teacher").symlink_to(tmp_path / "seed0" / "teacher")  # as easyvqa_seeds.py shares it
    capsys.readouterr()
    s1 = demo(seed=1)
    assert f"reusing the finished run in {tmp_path / 'seed1' / 'teacher'}" in capsys.readouterr().out

    def question_ids(root, name):
        (f,) = (root / name / "eval").glob("easyvqa-*.jsonl")
        return sorted(json.loads(x)["question_id"] for x in f.read_text().splitlines())

    ids = question_ids(tmp_path / "seed0", "baseline")
    assert len(ids) == 10 and all(question_ids(tmp_path / f"seed{s}", m) == ids
                                  for s in (0, 1) for m in ("baseline", "kd-v"))
    assert s1["methods"]["kd-v"]["final_losses"]["att"] == 0 < s1["methods"]["kd-v"]["final_losses"]["v_all"]
    capsys.readouterr()
    again = demo()  # nothing changed: every run is reused, the numbers are the same
    assert capsys.readouterr().out.count("reusing the finished run") == 3
    assert {m: r["accuracy"] for m, r in again["methods"].items()} == {m: r["accuracy"] for m, r in s0["methods"].items()}


def test_student_recipes_switch_terms_through_the_loss_group():
    d = DemoConfig(methods=",".join(STUDENTS))
    weights = {n: (lambda c: (c.kd_weight, c.att_weight, c.v_weight, c.variant))(loss_config(student_recipe(d, n)))
               for n in STUDENTS}
    assert weights == {"baseline": (0, 0, 0, "paper"), "logit-kd": (1, 0, 0, "paper"), "kd-att": (1, 1, 0, "paper"),
                       "kd-v": (1, 0, 1, "paper"), "alignkd": (1, 1, 1, "paper"), "release": (1, 1, 1, "release"),
                       "alignkd-cache-k8": (1, 1, 1, "paper"), "alignkd-cache-k32": (1, 1, 1, "paper"),
                       "alignkd-cache-full": (1, 1, 1, "paper")}
    assert student_recipe(DemoConfig(curve_every=100), "alignkd").keep_last == 3  # 100, 200 and the final 300
    assert student_recipe(DemoConfig(curve_every=70), "alignkd").keep_last == 5  # 70, 140, 210, 280, 300


def test_kd_from_cache_puts_the_paper_variant_kd_students_on_the_full_cache_only(tmp_path):
    d = DemoConfig(methods=",".join(STUDENTS), output_dir=str(tmp_path), kd_from_cache=True)
    caches = {n: student_recipe(d, n).teacher_cache for n in STUDENTS}
    full = str(tmp_path / "teacher" / "cache-full")
    assert caches == {"baseline": None, "release": None, "logit-kd": full, "kd-att": full, "kd-v": full, "alignkd": full,
                      "alignkd-cache-full": full, "alignkd-cache-k8": str(tmp_path / "teacher" / "cache-k8"),
                      "alignkd-cache-k32": str(tmp_path / "teacher" / "cache-k32")}
    assert all(student_recipe(d, n).loss.kd_topk == 512 for n in ("logit-kd", "kd-att", "kd-v", "alignkd"))
    assert student_recipe(DemoConfig(), "alignkd").teacher_cache is None  # off by default: the teacher runs online
    assert student_recipe(d, "alignkd").vision_feature_memo_gb == 2.0


@pytest.mark.parametrize("kw, message", [({"methods": "alignkd,baseline"}, "methods must list baseline first"),
                                         ({"methods": "baseline,kd"}, "methods must list baseline first"),
                                         ({"eval_limit": 0}, "eval_limit must be > 0"),
                                         ({"lr": -1.0}, "lr must be > 0"),
                                         ({"vision_feature_memo_gb": -1.0}, "vision_feature_memo_gb must be >= 0")])
def test_demo_config_is_checked(kw, message):
    with pytest.raises(ConfigError, match=message):
        DemoConfig(**kw)
