"""The statistics and the attention-alignment metrics of benchmarks/easyvqa_seeds.py (issue 16), on
hand-made numbers and tiny random models; the study itself is a benchmark, never run here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the scripts are not a package: they import each other by file name

import easyvqa_alignment as alignment  # noqa: E402
import easyvqa_seeds as seeds  # noqa: E402


@pytest.mark.parametrize("df, published", [(1, 12.7062), (4, 2.7764), (9, 2.2622), (29, 2.0452)])
def test_t_quantile_matches_the_published_table(df, published):
    assert seeds.t_quantile(0.975, df) == pytest.approx(published, abs=1e-4)
    assert seeds.t_quantile(0.025, df) == pytest.approx(-published, abs=1e-4)


@pytest.mark.parametrize("x", [-30.0, -1.5, 0.0, 0.4, 2.0, 300.0])
def test_t_cdf_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(x):
    import math

    assert seeds.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-10)  # Cauchy
    assert seeds.t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-10)


def test_paired_difference_t_interval_p_and_won_tied_lost_on_hand_made_counts():
    # 200 questions; right answers per seed: differences 2, 0, 5, -1, 10 answers = 1, 0, 2.5, -0.5, 5 points
    base, other = [100, 110, 120, 130, 140], [102, 110, 125, 129, 150]
    p = seeds.paired(other, base, 200)
    assert p["mean"] == pytest.approx(1.6) and p["std"] == pytest.approx(2.219234, abs=1e-6)
    # mean ± t(0.975, 4)·std/√5, and the two-sided p of t = 1.612 on 4 degrees of freedom (scipy's values)
    assert p["t_ci"] == pytest.approx([-1.155543, 4.355543], abs=1e-5)
    assert p["p_t"] == pytest.approx(0.182226, abs=1e-5)
    assert (p["won"], p["tied"], p["lost"], p["seeds"]) == (3, 1, 1, 5)
    lo, hi = p["bootstrap_ci"]
    assert -0.5 <= lo < 1.6 < hi <= 5.0  # inside the range of the differences, around their mean
    assert seeds.paired(base, other, 200)["t_ci"] == pytest.approx([-4.355543, 1.155543], abs=1e-5)  # antisymmetric


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    # 15 seeds at +1 and 15 at −1: a resample's mean is (2X − 30)/30 with X ~ Binomial(30, 1/2), whose
    # 2.5 % and 97.5 % quantiles are X = 10 and 20 (P(X ≤ 9) = 0.021, P(X ≤ 10) = 0.049): ±1/3
    p = seeds.differences([1.0, -1.0] * 15)
    assert p["bootstrap_ci"] == pytest.approx([-1 / 3, 1 / 3], abs=1 / 15)  # within one atom
    assert p["mean"] == 0 and p["p_t"] == pytest.approx(1.0)


def test_equal_seeds_give_a_zero_width_interval_and_only_ties():
    p = seeds.paired([7, 8, 9], [7, 8, 9], 10)
    assert p["t_ci"] == [0.0, 0.0] and p["bootstrap_ci"] == [0.0, 0.0] and p["p_t"] == 1.0
    assert (p["won"], p["tied"], p["lost"]) == (0, 3, 0)
    assert seeds.paired([5], [3], 10)["t_ci"] is None  # one seed: no interval


def test_summary_pairs_every_method_with_the_baseline_seed_by_seed():
    rows = [{"seed": s, "method": m, "correct": c, "n": 100, "accuracy": float(c),
             "by_type": {"colour": c / 2, "shape": 30.0 + s, "yes/no": 80.0}}
            for s, cs in ((0, (50, 60, 55)), (1, (40, 45, 45)), (2, (70, 69, 80)))
            for m, c in zip(("baseline", "logit-kd", "alignkd"), cs)]
    teacher = {"accuracy": 90.0, "by_type": {"colour": 95.0, "shape": 60.0, "yes/no": 99.0}}
    s = seeds.summarize(rows[::-1], teacher, ["baseline", "logit-kd", "alignkd"], [("alignkd", "logit-kd")])
    assert s["methods"]["baseline"]["per_seed"] == [50.0, 40.0, 70.0] and s["methods"]["baseline"]["vs_baseline"] is None
    assert s["methods"]["logit-kd"]["vs_baseline"]["mean"] == pytest.approx((10 + 5 - 1) / 3)
    kd = s["pairs"]["alignkd − logit-kd"]
    assert kd["mean"] == pytest.approx((-5 + 0 + 11) / 3) and (kd["won"], kd["tied"], kd["lost"]) == (1, 1, 1)
    table = seeds.accuracy_markdown(s)
    assert "| alignkd | 60.00 ± 18.03 | +6.67 ± 2.89 |" in table and "| alignkd − logit-kd | +2.00" in table
    assert "| teacher | 95.0 | 60.0 | 99.0 |" in table and "| alignkd | 30.0 ± 9.0 | 31.0 ± 1.0 | 80.0 ± 0.0 |" in table
    assert "| 2 | 70.00 | 69.00 | 80.00 |" in table  # per seed


def test_accuracy_by_question_kind_scores_as_easyvqa_does():
    from alignkd.eval.benchmarks import EvalItem

    items = [EvalItem(str(i), "x.png", "q?", {"answer": a})
             for i, a in enumerate(["circle", "triangle", "red", "teal", "yes", "no", "no"])]
    preds = {"0": "Circle.", "1": "circle", "2": "red", "3": "gray", "4": "yes", "5": " no "}  # "6" unanswered
    assert seeds.by_question_type(items, preds) == {"colour": 50.0, "shape": 50.0, "yes/no": pytest.approx(200 / 3)}


def test_alignment_of_a_model_with_itself_is_perfect_and_of_another_is_not(tmp_path):
    from alignkd.model import build_model
    from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir

    teacher = build_model("tiny-teacher", seed=0)
    data = alignment.held_out(teacher, load_tokenizer(tiny_tokenizer_dir()), n=6, seed=0, batch_size=4)
    same = alignment.alignment(teacher, data)
    assert same["kl"] == pytest.approx(0, abs=1e-9) and same["mse"] == pytest.approx(0, abs=1e-12)
    assert same["corr"] == pytest.approx(1) and same["top16"] == 1.0 and same["l_att"] is None
    student = build_model("tiny-student", seed=3)
    student.vision_tower.load_state_dict(teacher.vision_tower.state_dict())
    other = alignment.alignment(student, data)
    assert other["kl"] > 1e-6 and other["mse"] > 0 and other["top16"] < 1.0 and 0 < other["image_share"] < 1
    # the block rows are probability rows: the image share is what the rows put on the 144 vision columns
    with torch.no_grad():
        block, rows, _ = alignment.attention_block(student, data.batches[0])
    assert float(block.sum(-1)[rows[:, None, :].expand(-1, block.shape[1], -1)].max()) <= 1.0 + 1e-6
