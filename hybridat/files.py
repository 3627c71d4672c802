"""Safe artifacts: outputs checked before any work, never written over an input, written atomically.

Every command names its outputs and its inputs to `check_outputs` before it starts, and writes each output
through `atomic_path`: a hidden temp file beside the target (named with the writer's pid, so a later writer can
remove what a killed one left), created with the umask's mode, renamed onto the target only when complete.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from safetensors import SafetensorError

from .errors import HybridatError

TEMP_EXTRA = len("..") + 10 + len(".") + 8 + len(".tmp")  # ".NAME.<pid, <= 10 digits>.<8 hex>.tmp"


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder (or file) above `path` that exists; '.' for a relative path with none."""
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def as_path(value, what: str = "a path") -> Path:
    """`value` as a Path if it is a str or os.PathLike; one line naming what was given otherwise (a loaded
    Checkpoint or a model where a file is meant)."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise HybridatError(f"{what} must be a str or Path, got {type(value).__name__}")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether a and b name one file: the same path, relative or absolute, through a symlink, or a hardlink."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_outputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path] = ()) -> list[Path]:
    """Raise one clear HybridatError unless every output can be written: a non-empty name, not an existing folder,
    in a folder that exists or can be made and is writable, short enough for its temp name, and not the same file
    as any input. Call it before any work; returns the outputs as Paths."""
    if isinstance(inputs, (str, os.PathLike)):  # one path, not a list of one-character paths
        inputs = [inputs]
    try:
        inputs = [as_path(i, "an input path") for i in inputs]
    except TypeError:  # a number: Python's TypeError from the loop
        raise HybridatError(f"inputs must be a list of paths, got {type(inputs).__name__}") from None
    checked = []
    for out in outputs:
        out = as_path(out, "an output path")
        if str(out) in ("", "."):
            raise HybridatError("an output path is empty")
        if out.is_dir():
            raise HybridatError(f"{out} is a folder; give a file name")
        for i in inputs:
            if same_file(out, i):
                raise HybridatError(f"{out} is an input ({i}); outputs never overwrite inputs, choose another path")
        base = _existing_ancestor(out)
        if not base.is_dir():
            raise HybridatError(f"cannot create {out}: {base} is a file, not a folder")
        if not os.access(base, os.W_OK | os.X_OK):
            raise HybridatError(f"cannot write in {base}: permission denied")
        length, limit = len(os.fsencode(out.name)), _name_max(base) - TEMP_EXTRA
        if length > limit:
            raise HybridatError(f"file name too long: {out.name[:40]}... has {length} bytes, at most {limit} here")
        checked.append(out)
    return checked


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temps(path: Path) -> None:
    """Delete the temp files of `path` that writers killed without cleanup (SIGKILL) left behind."""
    prefix = f".{path.name}."
    try:
        siblings = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in siblings:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix):-len(".tmp")].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def umask() -> int:
    """This process's umask (Linux: read without changing it; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_LIVE: set[Path] = set()  # the temp paths atomic_path has yielded and not yet renamed or removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds. The temp file is removed
    on any exception, KeyboardInterrupt and (inside `signals_interrupt`) SIGTERM included; it has the umask's mode.
    Given a temp path it yielded (a writer that writes atomically, called by one that already does), it yields that
    path itself: a temp of a temp, left by a kill, was named so that no later writer removed it."""
    path = Path(path)
    if str(path) in ("", "."):
        raise HybridatError("an output path is empty")
    if path in _LIVE:  # the outer atomic_path renames or removes it
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0666 & ~umask, as open() would
        _LIVE.add(tmp)
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # some writers (safetensors) recreate the file with mode 0600
        os.replace(tmp, path)
    except OSError as e:
        # name the file the user asked for; a failed write() names no file, and a full disk is the one being written
        if (Path(e.filename) == tmp) if e.filename is not None else e.errno in (errno.ENOSPC, errno.EFBIG,
                                                                               errno.EDQUOT):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except SafetensorError as e:  # safetensors' failed write (a full disk): its OS error, naming the file
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
    finally:
        _LIVE.discard(tmp)
        if os.path.lexists(tmp):
            os.unlink(tmp)


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so that every `finally` (temp files, locks) runs."""


@contextmanager
def signals_interrupt():
    """Within the block SIGTERM raises Terminated (SIGINT already raises KeyboardInterrupt), so cleanup runs."""
    def handler(signum, frame):
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def os_error_line(e: OSError) -> str:
    """One line for an OS error: what failed and where (no traceback)."""
    what = e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or str(e) or type(e).__name__
    where = f": {e.filename}" if e.filename else ""
    return f"{what}{where}"
