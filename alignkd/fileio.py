"""Atomic writes and staged directories: a temp file or folder beside the target, then a rename.

A kill or a full disk never leaves a half-written file or folder under the final name. Temp names carry
the writer's pid (`.<name>.tmp-<pid>-<random>`), so the next writer in the same place removes the ones a
killed process left (`remove_stale_temps`). Everything written honours the umask, as `open` does
(`tempfile.mkdtemp` alone would make folders 0700 that another user of a pushed bundle cannot read).
A full disk surfaces as `DiskFull`, naming the file, whatever library was writing (`writing`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path

from .errors import AlignKDError

_TMP = ".tmp-"
_OLD = ".old-"


class DiskFull(AlignKDError):
    """No space left while writing; what was complete before is kept."""


# What json.loads raises on a file that is no JSON we can use: JSONDecodeError and UnicodeDecodeError (both
# ValueErrors), an int of more than 4300 digits (ValueError), nesting deeper than the stack (RecursionError).
BAD_JSON = (ValueError, RecursionError)
NAME_MAX = 255  # bytes of one file or folder name (Linux, macOS)


class OutputPathError(AlignKDError):
    """An output path that cannot be written as asked."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give a file or folder the mode `open` / `mkdir` would under the umask (safetensors and
    `tempfile` create theirs 0600 / 0700 whatever the umask)."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # safetensors (Rust) and other native writers report it in their message only
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


@contextlib.contextmanager
def writing(path: str | Path):
    """Turn a full disk inside the block into one `DiskFull` naming `path`."""
    try:
        yield
    except AlignKDError:
        raise
    except Exception as e:
        if _is_disk_full(e):
            raise DiskFull(f"disk full while writing {path}: no space left on device") from None
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(parent: str | Path, name: str | None = None) -> list[Path]:
    """Remove `.<name>.tmp-<pid>[-*]` / `.<name>.old-<pid>` entries in parent whose process is gone
    (name None: of any name, for folders that only we write into). An `.old-` entry whose name is missing
    is the previous version of a folder whose replacement was killed between its two renames: it is put
    back, not removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    stem = ".+?" if name is None else re.escape(name)
    pattern = re.compile(rf"^\.(?P<name>{stem})(?P<kind>{re.escape(_TMP)}|{re.escape(_OLD)})(?P<pid>\d+)(?:-.*)?$")
    removed = []
    for p in sorted(parent.iterdir(), key=lambda p: _OLD not in p.name):  # put back before removing
        m = pattern.match(p.name)
        if not m or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        final = parent / m["name"]
        if m["kind"] == _OLD and not os.path.lexists(final):
            os.rename(p, final)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_write(path: str | Path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP}{os.getpid()}")
    try:
        with writing(path), open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_dir(path: str | Path, option: str = "--output-dir") -> Path:
    """Refuse, before any work, an output folder that cannot be one: empty, or itself or an existing parent is a
    file."""
    if not str(path).strip():  # Path("") is the current folder
        raise OutputPathError(f"{option} is empty: name a folder")
    path = Path(path)
    if any(len(os.fsencode(part)) > NAME_MAX for part in path.parts):  # met only below a folder not made yet
        raise OutputPathError(f"{option} {path}: a file or folder name is longer than {NAME_MAX} bytes")
    for p in (path, *path.parents):
        try:
            mode = p.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):  # not there yet (a file further up is met there)
            continue
        except OSError as e:  # a name too long, a symbolic-link loop: found here, not after the work
            raise OutputPathError(f"{option} {path}: {e.strerror}") from None
        if not stat.S_ISDIR(mode):
            raise OutputPathError(f"{option} {path}: {p} is a file, not a folder")
        _check_writable(p, f"{option} {path}")
        break
    return path


def _check_writable(folder: Path, what: str) -> None:
    """Write and remove a temp file in `folder`, the nearest existing folder of an output: a read-only mount or
    an immutable folder (which even root cannot write; permission bits do not stop root) is found before the work,
    not at its first write."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".write-check{_TMP}", dir=folder)
    except OSError as e:
        raise OutputPathError(f"{what}: cannot write in {folder} ({e.strerror})") from None
    os.close(fd)
    os.unlink(name)


def check_replaceable_dir(path: str | Path, option: str = "--output-dir", inputs: tuple[str | Path, ...] = ()) -> Path:
    """`check_output_dir`, for a folder the command may replace as a whole (`--overwrite`): also refuse the
    current folder or one holding it, and one that is or holds an input — replacing it would delete them."""
    path = check_output_dir(path, option)
    final, cwd = path.resolve(), Path.cwd().resolve()
    if final == cwd or final in cwd.parents:
        raise OutputPathError(f"{option} {str(path)!r} is the current folder or holds it: name a new folder")
    for inp in inputs:
        held = Path(inp).resolve()
        if final == held or final in held.parents:
            raise OutputPathError(f"{option} {path} is or holds the input {inp}: name another folder")
    return path


def staged_dir(final: str | Path) -> Path:
    """A new empty temp folder beside `final` (same file system, so publishing is a rename), mode per umask.
    Stale temp folders of `final` left by killed processes are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP}{os.getpid()}-", dir=final.parent))
    apply_umask(tmp)
    return tmp


def publish_dir(tmp: Path, final: Path, merge: bool = False) -> None:
    """Move a fully written temp folder into place; an existing `final` is replaced only after that.

    merge=True keeps what else `final` holds (e.g. a training run's `train/` folder) and replaces the
    temp folder's entries one rename at a time, config.json last.
    """
    if merge and final.is_dir():
        for src in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            _replace(src, final / src.name)
        tmp.rmdir()
        return
    _replace(tmp, final)


@contextlib.contextmanager
def _signals_deferred():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block has run, then act as they would have. (Blocking them
    with a signal mask is not enough: any thread of torch's or onnxruntime's pools may take a process signal,
    and Python runs its handler in the main thread at the next bytecode.) Handlers live in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) is not None:  # None: a handler not set from Python, which could not be restored
            previous[s] = signal.signal(s, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def _replace(src: Path, dst: Path) -> None:
    """Rename src to dst; a folder on either side is swapped through a `.old-` name (rename cannot). Between
    the two renames nothing holds dst's name: Ctrl-C or SIGTERM wait until both are done (and the old folder
    is removed), and after a kill -9 there the next `remove_stale_temps` puts the `.old-` folder back."""
    if dst.exists() and (dst.is_dir() or src.is_dir()):
        old = dst.with_name(f".{dst.name}{_OLD}{os.getpid()}")
        with _signals_deferred():
            os.replace(dst, old)
            os.replace(src, dst)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    else:
        os.replace(src, dst)


class FolderLock:
    """An exclusive lock on an output folder (flock on the folder itself: nothing is added to it), taken
    without waiting. Two training runs started together into one folder both passed the "another run's
    settings?" check while it was empty and then mixed their files; a resume beside a live run crashed on the
    checkpoint the live run pruned. The lock ends with the process, however it ends."""

    def __init__(self, folder: str | Path, option: str, holder: str):
        self.folder, self.option, self.holder = Path(folder), option, holder
        self.fd: int | None = None

    def take(self) -> None:
        """Lock the folder if it exists (call again once it is made); refuse one another process holds."""
        if self.fd is not None or not self.folder.is_dir():
            return
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputPathError(f"{self.option} {self.folder} is being written by {self.holder}: wait for it to "
                                  "end, or name another folder") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class StagedDir:
    """`with StagedDir(final) as tmp:` write into tmp, call `publish()`; leaving the block any other way
    removes tmp and leaves `final` as it was."""

    def __init__(self, final: str | Path, overwrite: bool = False, exists_error: type[AlignKDError] = AlignKDError):
        self.final = Path(final)
        self.overwrite = overwrite
        self.exists_error = exists_error

    def __enter__(self) -> Path:
        check_output_dir(self.final, "output directory")  # --overwrite replaces a folder, never a file
        if self.final.exists() and not self.overwrite:
            raise self.exists_error(f"output directory {self.final} exists; pass --overwrite to replace it")
        self.tmp = staged_dir(self.final)
        return self.tmp

    def publish(self, merge: bool = False) -> None:
        if self.overwrite or merge:
            publish_dir(self.tmp, self.final, merge)
            return
        try:  # a plain rename never replaces a folder with files: one another process made meanwhile stays
            os.rename(self.tmp, self.final)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise self.exists_error(f"output directory {self.final} was written by another process while this one "
                                    "worked: it is kept, and this run's output is discarded") from None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
