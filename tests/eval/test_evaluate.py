"""`alignkd-mobile eval`: resumes a killed run to the same scores in LLaVA's answer format, scores existing
answer files without a model, and refuses bad requests with one `error:` line before any model loads."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

import alignkd.eval.evaluate as ev
from alignkd.cli import main
from alignkd.errors import CheckpointError, ConfigError, DataError
from alignkd.eval.evaluate import evaluate
from alignkd.model import build_model, save_model
from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir

QUIET = {"progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    tok = load_tokenizer(tiny_tokenizer_dir())
    for name, seed in (("alignkd", 0), ("baseline", 1)):
        save_model(build_model("tiny-student", seed=seed), root / name, tokenizer=tok)
    return root


@pytest.fixture()
def no_model(monkeypatch):
    """Fails the test if a model's weights are loaded."""
    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(ev, "load_model", refuse)


def test_resume_gives_the_same_scores_and_a_valid_answer_file(two_checkpoints, tmp_path):
    ckpts = [str(two_checkpoints / "alignkd"), str(two_checkpoints / "baseline")]
    kw = dict(limit=6, batch_size=4, max_new_tokens=3, distilled="alignkd", baseline="baseline", **QUIET)
    full = evaluate(ckpts, ["easyvqa"], None, tmp_path / "full", **kw)
    answers = tmp_path / "full" / "answers" / "alignkd" / "easyvqa.jsonl"
    rows = [json.loads(ln) for ln in answers.read_text().splitlines()]
    assert len(rows) == 6 and all(r["model_id"] == "alignkd" and r["metadata"] == {} for r in rows)
    assert rows[0]["prompt"].endswith("Answer the question using a single word or phrase.")
    # a "killed" run: 2 answers written and a torn third line
    part = tmp_path / "part" / "answers" / "alignkd" / "easyvqa.jsonl"
    part.parent.mkdir(parents=True)
    lines = answers.read_text().splitlines()
    part.write_text("\n".join(lines[:2]) + '\n{"question_id": "12", "pro')
    said = []
    resumed = evaluate(ckpts, ["easyvqa"], None, tmp_path / "part", **{**kw, "log": said.append})
    assert resumed == full
    # the resume is said, as is the cut (and the unstamped answers taken as this checkpoint's)
    assert f"alignkd easyvqa: 2 of 6 questions already answered in {part}; answering the other 4" in said
    assert f"alignkd easyvqa: cut the torn last line of {part} (26 bytes a killed run left)" in said
    assert any("answers without a model.json stamp" in line for line in said)
    resumed_rows = [json.loads(ln) for ln in part.read_text().splitlines()]  # every line parses: torn tail cut
    assert [r["question_id"] for r in resumed_rows] == [r["question_id"] for r in rows]
    assert resumed_rows[:2] == rows[:2]  # the first two were not asked again
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert set(report["metrics"]) == {"alignkd", "baseline"}
    assert report["metrics"]["alignkd"]["easyvqa"]["n_unknown_ids"] == 0
    assert (tmp_path / "full" / "report_radar.png").read_bytes()[:4] == b"\x89PNG"
    assert "| alignkd |" in (tmp_path / "full" / "report.md").read_text()


def test_scores_an_answer_file_without_a_model(assets, tmp_path, no_model):
    # LLaVA's POPE answers: question ids from llava_pope_test.jsonl (adversarial 1-4, random 10,000,001-4, popular
    # 20,000,001-4); every reply right except adversarial 4 ("No" on a yes): adversarial TP 1, TN 2, FN 1 ->
    # F1 = 2 x 1 x .5 / 1.5 = 66.67; random and popular 100 -> mean F1 (66.67 + 100 + 100) / 3 = 88.89.
    labels = {1: "Yes", 2: "No", 3: "No", 4: "No", 10_000_001: "Yes", 10_000_002: "No", 10_000_003: "Yes",
              10_000_004: "No", 20_000_001: "Yes", 20_000_002: "Yes", 20_000_003: "No", 20_000_004: "No"}
    rows = [{"question_id": q, "prompt": "p", "text": t, "answer_id": "a", "model_id": "llava", "metadata": {}}
            for q, t in labels.items()]
    rows.append({"question_id": 5, "prompt": "p", "text": "Yes"})  # adversarial line 5 is unusable: unknown id
    f = tmp_path / "llava-v1.5-13b.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    log: list[str] = []
    res = evaluate([], ["pope"], str(assets), tmp_path / "out", answers=[f], progress=False, log=log.append)
    m = res["llava-v1.5-13b"]["pope"]
    assert m["score"] == pytest.approx((200 / 3 + 100 + 100) / 3)
    assert (m["n_unknown_ids"], m["n_bad_lines"], m["n_missing"], m["n_malformed_rows"]) == (1, 1, 0, 2)
    assert any("1 answer(s) to questions the benchmark does not know" in ln and "5" in ln for ln in log)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "POPE: LLaVA eval_pope.py" in md and "mean F1 of adversarial, random and popular" in md
    assert "| llava-v1.5-13b | POPE | 12 | 0 | 1 | 2 |" in md
    # one answer fewer: that question is scored wrong and counted
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    m = evaluate([], ["pope"], str(assets), tmp_path / "out2", answers=[f], **QUIET)["llava-v1.5-13b"]["pope"]
    assert m["n_missing"] == 1 and m["adversarial_f1"] == 0.0  # its only true positive became a false negative
    # a question answered twice: the last answer counts, and the log says so
    f.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {**rows[3], "text": "Yes"}]))
    log.clear()
    m = evaluate([], ["pope"], str(assets), tmp_path / "out3", answers=[f], progress=False,
                 log=log.append)["llava-v1.5-13b"]["pope"]
    assert m["n_duplicate_answers"] == 1 and m["adversarial_f1"] == 100.0  # adversarial 4 now right
    assert f"llava-v1.5-13b pope: 1 question(s) answered more than once in {f}: the last answer counts" in log


def test_our_answer_file_scores_the_same_through_answers(two_checkpoints, assets, tmp_path):
    ckpt = str(two_checkpoints / "alignkd")
    ours = evaluate([ckpt], ["mmbench"], str(assets), tmp_path, limit=1, batch_size=4, max_new_tokens=2, **QUIET)
    again = evaluate([], ["mmbench"], str(assets), tmp_path / "again", limit=1,
                     answers=[tmp_path / "answers" / "alignkd" / "mmbench.jsonl"], **QUIET)
    assert again["mmbench"] == ours["alignkd"]
    rows = [json.loads(ln) for ln in (tmp_path / "answers" / "alignkd" / "mmbench.jsonl").read_text().splitlines()]
    # model_vqa_mmbench's fields, the TSV's indices as question ids
    assert [r["question_id"] for r in rows] == [0, 1_000_000, 2_000_000, 3_000_000]
    assert rows[0]["options"] == ["red", "green", "blue", "yellow"] and rows[0]["round_id"] == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"benches": ["gqa"], "data_root": None}, "--data-root is required for gqa"),
    ({"batch_size": 0}, "--batch-size must be a positive integer, got 0"),
    ({"limit": 0}, "--limit must be a positive integer, got 0"),
    ({"max_new_tokens": -5}, "--max-new-tokens must be a positive integer, got -5"),
    ({"benches": ["vqav2"]}, "unknown benchmark 'vqav2'"),
    ({"benches": []}, "--bench names no benchmark"),
    ({"distilled": "nope", "baseline": "b"}, "--distilled 'nope' is not one of the runs: a, b"),
    ({"distilled": "a"}, "name both --distilled and --baseline"),
    ({"checkpoints": ["x/a", "y/a"]}, "the runs need different names .*: a is given twice"),
    ({"checkpoints": []}, "nothing to evaluate"),
    ({"device": "tpu"}, "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ({"device": "cuda:7"}, r"--device cuda:7: (this machine has no CUDA device|it has \d+ CUDA device)"),
    ({"dtype": "int8"}, "--dtype must be auto, fp32, bf16, fp16, got 'int8'"),
])
def test_bad_requests_fail_before_anything_loads(tmp_path, no_model, kwargs, message):
    # the checkpoint directories do not even exist: the request is refused before they are read
    args = dict(checkpoints=[str(tmp_path / "a"), str(tmp_path / "b")], benches=["easyvqa"], data_root=None)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        evaluate(args.pop("checkpoints"), args.pop("benches"), args.pop("data_root"), tmp_path / "o", **args, **QUIET)


def test_answers_requests(tmp_path, no_model):
    f = tmp_path / "a.jsonl"
    f.write_text("")
    with pytest.raises(ConfigError, match="not both"):
        evaluate([str(tmp_path)], ["easyvqa"], None, tmp_path / "o", answers=[f], **QUIET)
    with pytest.raises(ConfigError, match="one --bench"):
        evaluate([], ["easyvqa", "gqa"], str(tmp_path), tmp_path / "o", answers=[f], **QUIET)
    with pytest.raises(DataError, match="nope.jsonl not found"):
        evaluate([], ["easyvqa"], None, tmp_path / "o", answers=[tmp_path / "nope.jsonl"], limit=2, **QUIET)
    with pytest.raises(DataError, match="is not a folder"):
        evaluate([], ["gqa"], str(f), tmp_path / "o", answers=[f], **QUIET)


def test_a_benchmark_with_no_usable_question_is_an_error_not_a_score(assets, tmp_path, no_model):
    root = tmp_path / "data"
    shutil.copytree(assets / "gqa", root / "gqa")
    questions = root / "gqa" / "data" / "testdev_balanced_questions.json"
    f = tmp_path / "a.jsonl"
    f.write_text('{"question_id": "1", "text": "yes"}\n')
    questions.write_text("{}")
    with pytest.raises(DataError, match=r"gqa: no usable question in .*testdev_balanced_questions.json$"):
        evaluate([], ["gqa"], str(root), tmp_path / "o", answers=[f], **QUIET)
    questions.write_text(json.dumps({"1": [1, 2], "2": 7}))
    with pytest.raises(DataError, match=r"gqa: no usable question in .* \(2 unusable row\(s\), e\.g\. "):
        evaluate([], ["gqa"], str(root), tmp_path / "o", answers=[f], **QUIET)
    assert not (tmp_path / "o").exists()


def test_an_eval_that_stops_before_its_first_answer_leaves_no_folder(ckpt, tmp_path):
    short = shutil.copytree(ckpt, tmp_path / "short")
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 8}))
    with pytest.raises(DataError, match=r"exceeds the context of 8 \(the model's max_position_embeddings\)"):
        evaluate([str(short)], ["easyvqa"], None, tmp_path / "o", limit=2, **QUIET)
    assert not (tmp_path / "o").exists()


def test_refuses_a_tokenizer_that_does_not_match_before_loading_weights(two_checkpoints, tmp_path, no_model):
    bad = tmp_path / "bad"
    shutil.copytree(two_checkpoints / "alignkd", bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=3)))
    with pytest.raises(ConfigError, match=f"tokenizer does not match checkpoint {bad}.*EOS id 2 != model eos_token_id 3"):
        evaluate([str(bad)], ["easyvqa"], None, tmp_path / "o", limit=2, **QUIET)
    with pytest.raises(CheckpointError):
        evaluate([str(tmp_path / "missing")], ["easyvqa"], None, tmp_path / "o", limit=2, **QUIET)


def test_missing_benchmark_files_name_both_layouts(two_checkpoints, tmp_path, no_model):
    with pytest.raises(DataError, match="testdev_balanced_questions.json.*data/testdev_balanced_questions.json"):
        evaluate([str(two_checkpoints / "alignkd")], ["gqa"], str(tmp_path), tmp_path / "o", **QUIET)


@pytest.mark.parametrize("args, message", [
    (["eval", "ckpt", "--bench", "gqa"], "error: --data-root is required for gqa"),
    (["eval", "ckpt", "--batch-size", "0"], "error: --batch-size must be a positive integer, got 0"),
    (["eval", "ckpt", "--limit", "0"], "error: --limit must be a positive integer, got 0"),
    (["eval", "ckpt", "--max-new-tokens", "0"], "error: --max-new-tokens must be a positive integer, got 0"),
    (["eval", "a/ckpt", "--distilled", "x", "--baseline", "ckpt"], "error: --distilled 'x' is not one of the runs: ckpt"),
    (["eval", "ckpt", "--device", "tpu"], "error: --device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_cli_prints_one_error_line(args, message):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith(message) and len(r.stderr.strip().splitlines()) == 1


def test_a_checkpoint_retrained_in_place_is_never_scored_with_the_previous_answers(tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir())
    ckpt = tmp_path / "student"
    save_model(build_model("tiny-student", seed=0), ckpt, tokenizer=tok)
    kw = dict(limit=4, batch_size=4, max_new_tokens=3, **QUIET)
    evaluate([str(ckpt)], ["easyvqa"], None, tmp_path / "out", **kw)
    answers = tmp_path / "out" / "answers" / "student" / "easyvqa.jsonl"
    rows = [json.loads(ln) for ln in answers.read_text().splitlines()]
    answers.write_text("".join(json.dumps({**r, "text": "zzz"}) + "\n" for r in rows))  # answers already on file
    same = evaluate([str(ckpt)], ["easyvqa"], None, tmp_path / "out", **kw)
    assert same["student"]["easyvqa"]["valid_answer_rate"] == 0.0  # same weights: the file's answers are used
    save_model(build_model("tiny-student", seed=1), ckpt, tokenizer=tok)  # retrained into the same folder
    again = evaluate([str(ckpt)], ["easyvqa"], None, tmp_path / "out", **kw)
    fresh = evaluate([str(ckpt)], ["easyvqa"], None, tmp_path / "fresh", **kw)
    assert again == fresh
    assert "zzz" not in answers.read_text()
    # a stamp of an earlier version holds the path as given (relative): still this folder, retrained
    stamp = answers.parent / "model.json"
    stamp.write_text(json.dumps({"checkpoint": os.path.relpath(ckpt), "weights_digest": "an earlier model's"}))
    assert evaluate([str(ckpt)], ["easyvqa"], None, tmp_path / "out", **kw) == fresh


def test_answers_beyond_limit_are_not_unknown_questions(two_checkpoints, tmp_path):
    kw = dict(batch_size=4, max_new_tokens=2, progress=False)
    evaluate([str(two_checkpoints / "alignkd")], ["easyvqa"], None, tmp_path / "a", limit=6, log=lambda *_: None, **kw)
    answers = tmp_path / "full.jsonl"  # a fuller eval's answers, and one to a question no benchmark has
    answers.write_bytes((tmp_path / "a" / "answers" / "alignkd" / "easyvqa.jsonl").read_bytes()
                        + b'{"question_id": "no-such-question", "text": "yes"}\n')
    said: list[str] = []
    m = evaluate([], ["easyvqa"], None, tmp_path / "b", limit=3, answers=[answers], log=said.append, **kw)
    m = m["full"]["easyvqa"]
    assert m["n_unknown_ids"] == 1  # only the made-up question: not the answers --limit left out
    assert any("1 answer(s) to questions the benchmark does not know" in ln and "no-such-question" in ln for ln in said)
    outside = 6 - (3 - int(m["n_missing"]))  # the 6 answers less those to the 3 questions scored
    assert outside > 0 and f"full easyvqa: {outside} answer(s) to questions outside the 3 scored (--limit), not scored" in said


def test_answers_of_another_checkpoint_or_length_are_kept_and_the_eval_refused(two_checkpoints, tmp_path, monkeypatch):
    a, b = tmp_path / "A" / "student", tmp_path / "B" / "student"  # two runs whose folders share a name
    shutil.copytree(two_checkpoints / "alignkd", a)
    shutil.copytree(two_checkpoints / "baseline", b)
    kw = dict(limit=4, batch_size=4, max_new_tokens=3, **QUIET)
    evaluate([str(a)], ["easyvqa"], None, tmp_path / "out", **kw)
    answers = tmp_path / "out" / "answers" / "student" / "easyvqa.jsonl"
    before = answers.read_bytes()
    monkeypatch.setattr(ev, "load_model", lambda *_: pytest.fail("a model loaded before the refusal"))
    with pytest.raises(DataError, match=r"holds the answers of another checkpoint \('.*A/student', also named"):
        evaluate([str(b)], ["easyvqa"], None, tmp_path / "out", **kw)  # deleted them and answered anew
    with pytest.raises(DataError, match="answers made with --max-new-tokens 3, this eval asks 1: give --max-new-tokens 3 to resume"):
        evaluate([str(a)], ["easyvqa"], None, tmp_path / "out", **{**kw, "max_new_tokens": 1, "limit": 8})  # mixed
    assert answers.read_bytes() == before


def test_distilled_and_baseline_may_be_named_by_their_checkpoint_paths(two_checkpoints, tmp_path):
    ckpts = [str(two_checkpoints / "alignkd"), str(two_checkpoints / "baseline")]
    evaluate(ckpts, ["easyvqa"], None, tmp_path / "a", limit=2, batch_size=4, max_new_tokens=2, distilled=ckpts[0],
             baseline=ckpts[1], **QUIET)  # was: "--distilled '.../alignkd' is not one of the runs: alignkd, baseline"
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert (report["difference"]["distilled"], report["difference"]["baseline"]) == ("alignkd", "baseline")


def test_answers_in_another_precision_are_not_mixed(two_checkpoints, tmp_path):
    ckpt, out = str(two_checkpoints / "alignkd"), tmp_path / "out"
    kw = dict(limit=4, batch_size=4, max_new_tokens=2, **QUIET)
    bf16 = evaluate([ckpt], ["easyvqa"], None, out, dtype="bf16", **kw)["alignkd"]["easyvqa"]
    stamp = out / "answers" / "alignkd" / "model.json"
    assert json.loads(stamp.read_text())["dtype"] == "bf16"
    answers = out / "answers" / "alignkd" / "easyvqa.jsonl"
    before = answers.read_bytes()
    with pytest.raises(DataError, match=r"answers made with --dtype 'bf16', this eval asks fp32: give --dtype 'bf16' "
                                        "to resume them"):
        evaluate([ckpt], ["easyvqa"], None, out, **{**kw, "limit": 8})  # on this CPU: fp32
    assert answers.read_bytes() == before
    assert evaluate([ckpt], ["easyvqa"], None, out, dtype="bf16", **kw)["alignkd"]["easyvqa"] == bf16  # resumed
    fp32 = evaluate([ckpt], ["easyvqa"], None, tmp_path / "fp32", **kw)["alignkd"]["easyvqa"]
    assert fp32["n"] == bf16["n"] == 4
    # a stamp written before --dtype existed: those evals ran on the CPU in fp32, and resume so
    old = tmp_path / "fp32" / "answers" / "alignkd" / "model.json"
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "dtype"}))
    assert evaluate([ckpt], ["easyvqa"], None, tmp_path / "fp32", **kw)["alignkd"]["easyvqa"] == fp32


def test_scoring_answer_files_needs_no_device(assets, tmp_path, no_model):
    # no model is loaded, so a --device this machine lacks is no reason to refuse
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    rows = tmp_path / "a.jsonl"
    rows.write_text('{"question_id": "x", "text": "yes"}\n')
    evaluate([], ["easyvqa"], None, tmp_path / "o", limit=2, answers=[rows], device="cuda:7", **QUIET)
