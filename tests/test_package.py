"""The tests import the installed package (the README's install), and `export/` lives inside our namespace."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import alignkd
import alignkd.export

REPO = Path(__file__).resolve().parents[1]


def test_export_is_installed_as_alignkd_export_not_top_level():
    assert Path(alignkd.export.__file__).resolve() == REPO / "export" / "__init__.py"
    assert Path(alignkd.__file__).resolve() == REPO / "alignkd" / "__init__.py"
    # from a neutral directory, a top-level `export` must not resolve to our folder
    code = "import importlib.util,sys; s=importlib.util.find_spec('export'); print(s.origin if s else 'none')"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True).stdout.strip()
    assert not out.startswith(str(REPO)), out


def test_distribution_metadata_and_console_script():
    dist = importlib.metadata.distribution("alignkd-mobile")
    assert any(ep.name == "alignkd-mobile" and ep.value == "alignkd.cli:main" for ep in dist.entry_points)
    reqs = " ".join(dist.requires or [])
    assert "torch==2.13.0" in reqs and "executorch==1.5.1" in reqs  # the stack is pinned (DESIGN.md §4)
    r = subprocess.run([str(Path(sys.executable).with_name("alignkd-mobile")), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "info" in r.stdout


def test_info_command_counts_parameters():
    r = subprocess.run([str(Path(sys.executable).with_name("alignkd-mobile")), "info", "mobilevlm-v2-1.7b"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # LM 2·32000·2048 (embeddings, head) + 24·(4·2048² + 3·2048·5632 + 2·2048) + 2048 = 1,364,297,728, CLIP ViT-L/14-336
    # 303,507,456 (the model card's 304 M), LDPv2 2048·1024 + 2048 + 2048² + 2048 + 9·2048 + 2048 = 6,316,032
    assert "1,674,121,216" in r.stdout and "LDPv2" in r.stdout and r.stderr.strip() == ""
    bad = subprocess.run([str(Path(sys.executable).with_name("alignkd-mobile")), "info", "/nonexistent/ckpt"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: checkpoint directory /nonexistent/ckpt does not exist"
    empty = subprocess.run([str(Path(sys.executable).with_name("alignkd-mobile")), "info", ""],
                           capture_output=True, text=True)  # not ./config.json
    assert empty.returncode == 2 and empty.stderr.startswith("error: PRESET_OR_DIR is empty: name a preset (")


def test_info_help_names_every_preset():
    from click.testing import CliRunner

    from alignkd.cli import main
    from alignkd.model import PRESETS

    text = " ".join(CliRunner().invoke(main, ["info", "--help"], terminal_width=1000).output.split())
    assert [p for p in PRESETS if p not in text.replace("- ", "-")] == []


def test_a_full_or_closed_standard_output_is_one_error_line():
    """`train-keys > /dev/full` (a full disk under a redirected listing) and `--help > /dev/full` raised a
    traceback from click.echo; with standard output closed (`>&-`) every answer vanished with exit status 0."""
    cli = str(Path(sys.executable).with_name("alignkd-mobile"))
    for args in (["train-keys"], ["info", "tiny-student", "--json"], ["--help"], ["--version"], ["export", "--help"]):
        with open("/dev/full", "w") as full:
            r = subprocess.run([cli, *args], stdout=full, stderr=subprocess.PIPE, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: standard output is on a full disk: what this "
                                                         "command printed is lost"), (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1, r.stderr
        r = subprocess.run([cli, *args], stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
        assert r.returncode == 2 and r.stderr.startswith("error: standard output is closed"), (args, r.stderr)


def test_an_argument_that_is_not_utf8_is_one_error_line(tmp_path):
    """A folder name of non-UTF-8 bytes (legal on Linux): onnxruntime raised a TypeError from its session, and
    `run` blamed the bundle's tokenizer as a corrupt SentencePiece model."""
    cli = str(Path(sys.executable).with_name("alignkd-mobile"))
    r = subprocess.run([cli, "info", os.fsencode(tmp_path) + b"/\xfaout"], capture_output=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.decode() == (f"error: argument '{tmp_path}/\\xfaout' is not UTF-8 text: paths and prompts must be "
                                 "(ExecuTorch, onnxruntime and SentencePiece open UTF-8 paths only)\n")
    # UTF-8 indeed, in a locale whose file names are ASCII: the locale is named, not the argument
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    r = subprocess.run([cli, "info", "bündle"], capture_output=True, env=env)
    assert r.returncode == 2 and r.stderr.decode().startswith("error: argument 'bündle' cannot be read in this locale "
                                                              "(its file-name encoding is ascii): set LC_ALL=C.UTF-8"), r.stderr


def test_an_error_during_a_progress_bar_starts_its_own_line(capsys):
    import pytest
    from tqdm import tqdm

    from alignkd.cli import _clean_errors
    from alignkd.errors import DataError

    @_clean_errors
    def command():
        bar = tqdm(total=4, desc="teacher cache", mininterval=0)
        bar.update(1)  # the redraw ends in "\r", not a newline
        raise DataError("shard-00001 is cut short")

    with pytest.raises(SystemExit) as e:
        command()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "\nerror: shard-00001 is cut short\n" in err, repr(err)


def test_ctrl_c_during_a_progress_bar_leaves_aborted_as_the_last_line():
    """The bar Ctrl-C interrupted used to be closed when it was collected, after `aborted`: its redraw (at 51 %,
    or 100 %) was the last thing on the terminal."""
    script = """
import sys, click
from tqdm import tqdm
from alignkd.cli import main

@main.command("interrupted")
def interrupted():
    bar = tqdm(total=4, desc="teacher cache", mininterval=0)
    bar.update(1)
    raise KeyboardInterrupt

sys.argv = ["alignkd-mobile", "interrupted"]
main()
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.endswith("\naborted\n"), repr(r.stderr)


def test_the_main_help_lists_every_command_once():
    from click.testing import CliRunner

    from alignkd.cli import main

    text = CliRunner().invoke(main, ["--help"]).output
    listed = re.findall(r"^  ([a-z][a-z-]*) {2,}", text, flags=re.M)
    assert sorted(listed) == sorted(main.commands), text  # click's own (alphabetical, cut short) list is not repeated
