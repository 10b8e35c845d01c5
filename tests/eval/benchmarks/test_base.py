"""The registry, the `Benchmark` protocol, finding a benchmark's folder, and the shared checks."""

import pytest

from alignkd.errors import ConfigError, DataError
from alignkd.eval.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from alignkd.eval.benchmarks.base import Layout, check_limit, locate

LAYOUTS = (Layout("the release", "q.json", "q.json + images/"), Layout("LLaVA-1.5's x/", "data/q.json", "data/q.json"))


def test_registry():
    assert list(BENCHMARKS) == ["easyvqa", "gqa", "sqa", "textvqa", "pope", "mme", "mmbench"]
    for name, b in BENCHMARKS.items():
        assert b.name == name and isinstance(b, Benchmark) and b.rule
    assert get_benchmark("gqa") is BENCHMARKS["gqa"]
    with pytest.raises(ConfigError, match="unknown benchmark 'vqav2'; known: easyvqa, gqa"):
        get_benchmark("vqav2")


def test_locate_looks_in_the_folder_then_its_named_subfolder(tmp_path):
    (tmp_path / "x" / "data").mkdir(parents=True)
    (tmp_path / "x" / "data" / "q.json").write_text("{}")
    assert locate("x", tmp_path, ("x",), LAYOUTS) == (tmp_path / "x", LAYOUTS[1])
    assert locate("x", tmp_path / "x", ("x",), LAYOUTS) == (tmp_path / "x", LAYOUTS[1])
    (tmp_path / "x" / "q.json").write_text("{}")  # both: the first layout wins
    assert locate("x", tmp_path / "x", ("x",), LAYOUTS)[1] == LAYOUTS[0]


def test_locate_errors(tmp_path):
    with pytest.raises(DataError) as e:
        locate("x", tmp_path, ("x", "y"), LAYOUTS)
    assert str(e.value) == (f"x: no benchmark files found in {tmp_path} and {tmp_path}/{{x,y}}; expected "
                            "the release: q.json + images/; or LLaVA-1.5's x/: data/q.json")
    with pytest.raises(ConfigError, match="--data-root is required"):
        locate("x", None, (), LAYOUTS)
    (tmp_path / "f").write_text("")
    with pytest.raises(DataError, match="is not a folder"):
        locate("x", tmp_path / "f", (), LAYOUTS)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_limit_must_be_positive(bad):
    with pytest.raises(ConfigError, match="limit must be a positive integer"):
        check_limit(bad)
    check_limit(None)
    check_limit(1)


@pytest.mark.parametrize("name", ["gqa", "sqa", "textvqa", "pope", "mme", "mmbench"])
def test_limit_zero_is_refused_by_every_reader(assets, name):
    with pytest.raises(ConfigError):
        BENCHMARKS[name].load(assets, limit=0)


def test_the_eval_folder_holds_every_benchmark(assets):
    # data_root = LLaVA-1.5's playground/data/eval (the fixtures' layout): each finds its subfolder
    for name, b in BENCHMARKS.items():
        items, _ = b.load(assets)
        assert items, name
