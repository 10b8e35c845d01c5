import os
import stat
import subprocess
import sys

import pytest

from alignkd.errors import DataError
from alignkd.fileio import DiskFull, StagedDir, atomic_write, publish_dir, remove_stale_temps, staged_dir, writing


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_staged_dir_and_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tmp = staged_dir(tmp_path / "bundle")
        atomic_write(tmp / "a.json", "{}")
        publish_dir(tmp, tmp_path / "bundle")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o755  # mkdtemp alone gives 0700
    assert stat.S_IMODE((tmp_path / "bundle" / "a.json").stat().st_mode) == 0o644


def test_stale_temps_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale = [tmp_path / f".ckpt.tmp-{dead}-abc", tmp_path / f".ckpt.old-{dead}"]
    for p in stale:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x" * 10)
    kept = [tmp_path / f".ckpt.tmp-{live}-def", tmp_path / f".other.tmp-{dead}-x", tmp_path / "ckpt"]
    for p in kept:
        p.mkdir()
    removed = remove_stale_temps(tmp_path, "ckpt")
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    # staged_dir cleans up before it makes its own
    (tmp_path / f".ckpt.tmp-{dead}-zzz").mkdir()
    tmp = staged_dir(tmp_path / "ckpt")
    assert not (tmp_path / f".ckpt.tmp-{dead}-zzz").exists() and tmp.name.startswith(f".ckpt.tmp-{os.getpid()}-")


@pytest.mark.parametrize("name", ["b", None])
def test_a_folder_whose_replacement_was_killed_between_its_renames_is_put_back(tmp_path, name):
    dead = _dead_pid()
    old, half = tmp_path / f".b.old-{dead}", tmp_path / f".b.tmp-{dead}-x"  # the old bundle set aside, the new one
    for p in (old, half):
        p.mkdir()
        (p / "manifest.json").write_text(p.name)
    removed = remove_stale_temps(tmp_path, name)
    assert removed == [half] and (tmp_path / "b" / "manifest.json").read_text() == old.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_signal_between_the_two_renames_waits_for_the_second(tmp_path, monkeypatch):
    import signal

    final, new = tmp_path / "b", tmp_path / "new"
    for p, text in ((final, "old"), (new, "new")):
        p.mkdir()
        (p / "manifest.json").write_text(text)
    real, done = os.replace, []

    def replace(src, dst):  # a signal lands right after the old folder moved aside
        real(src, dst)
        done.append(dst)
        if len(done) == 1:
            os.kill(os.getpid(), signal.SIGHUP)

    def stop(*_):
        raise RuntimeError(f"stopped after {len(done)} rename(s)")

    previous = signal.signal(signal.SIGHUP, stop)
    monkeypatch.setattr(os, "replace", replace)
    try:
        with pytest.raises(RuntimeError, match="after 2 rename"):
            publish_dir(new, final)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (final / "manifest.json").read_text() == "new"


def test_publish_replaces_a_folder_only_after_it_is_complete(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with StagedDir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # nothing replaced before publish
        with pytest.raises(RuntimeError):
            with StagedDir(tmp_path / "other") as t2:
                (t2 / "x").write_text("x")
                raise RuntimeError("killed")
    # no publish: the block exited, the temp folder is gone and the old content stays
    assert (final / "old.txt").exists() and not (final / "new.txt").exists()
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    staged = StagedDir(final, overwrite=True)
    with staged as tmp:
        (tmp / "new.txt").write_text("new")
        staged.publish()
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_a_full_disk_from_any_writer_names_the_file(tmp_path):
    with pytest.raises(DiskFull, match=r"disk full while writing .*model\.safetensors"):
        with writing(tmp_path / "model.safetensors"):
            # what safetensors' Rust writer raises
            raise Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                            "message: \"No space left on device\" })")
    with pytest.raises(DiskFull, match="x.gguf"):
        with writing(tmp_path / "x.gguf"):
            raise OSError(28, "No space left on device")
    with pytest.raises(ValueError):  # anything else passes through
        with writing(tmp_path / "y"):
            raise ValueError("not a disk problem")


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(tmp_path):
    """A read-only mount (root writes through permission bits, not through this): found by check_output_dir,
    which every command runs before its work, not at the first write after it (bench measured everything
    first). Also a name longer than a file system takes, and a symbolic-link loop."""
    from alignkd.fileio import OutputPathError, check_output_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a read-only tmpfs")
    try:
        with pytest.raises(OutputPathError, match=rf"--output-dir {ro}/bench/x: cannot write in {ro} \(Read-only"):
            check_output_dir(ro / "bench" / "x")
        assert list(ro.iterdir()) == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert check_output_dir(ro / "bench") == ro / "bench" and list(tmp_path.iterdir()) == [ro]  # the check left nothing
    with pytest.raises(OutputPathError, match="a file or folder name is longer than 255 bytes"):
        check_output_dir(tmp_path / "new" / ("a" * 256))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(OutputPathError, match="loop/sub: Too many levels of symbolic links"):
        check_output_dir(tmp_path / "loop" / "sub")


def test_a_folder_another_process_made_while_staging_is_kept(tmp_path):
    """Two exports without --overwrite into one folder both exited 0; the second replaced the first's bundle."""
    final = tmp_path / "bundle"
    staged = StagedDir(final, exists_error=DataError)
    with pytest.raises(DataError, match="was written by another process while this one worked: it is kept"):
        with staged as tmp:
            (tmp / "mine.txt").write_text("this run")
            final.mkdir()  # the other export publishes first
            (final / "theirs.txt").write_text("the other run")
            staged.publish()
    assert [p.name for p in final.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # this run's temp folder is gone
