"""Write files and directories atomically: a temporary sibling, swapped into place at the end.

A kill at any moment leaves the old output or the new one, complete: directories are exchanged in one
`renameat2(RENAME_EXCHANGE)` (Linux), and the old one is deleted only after. Every directory gets a marker
(`compress.outputs.MARKER`) recording each file's size and sha256. Existing paths the tool did not write are refused
(see `compress.outputs`). Temporary siblings of dead runs (`.NAME.PID.*.tmp`) are swept by the next writer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress.errors import EnvironmentFault, UserError
from compress.outputs import MARKER, may_replace, nearest_existing, protected, refusal, stamp

_NO_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS}
_FAULT_ENV = "COMPRESS_FAULT_AT"  # tests only: SIGKILL this process at a named point of the install


@contextlib.contextmanager
def atomic_dir(target: Path, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` (with the integrity marker written),
    on failure it is removed. `expected_bytes` checks the free space first."""
    target = Path(target).expanduser().absolute()
    _refuse_early(target)
    _make_parent(target)
    sweep(target)
    if expected_bytes:
        require_space(target, expected_bytes)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise _translate(exc, target, None) from exc
    try:
        yield tmp
        _complete(tmp, target)
    except BaseException as exc:
        written = _tree_bytes(tmp) if _disk_full(exc) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and (err := _translate(exc, target, written)) is not exc:
            raise err from exc
        raise


RESUME_RECORD = "resume.json"  # in a partial directory: what the run was asked (its inputs' hash) and what it did


def partial_dir(target: Path) -> Path:
    """Where a resumable run of `target` keeps its work until it is complete: `.NAME.partial` beside it."""
    target = Path(target).expanduser().absolute()
    return target.parent / f".{target.name}.partial"


@contextlib.contextmanager
def resumable_dir(target: Path, resume: bool) -> Iterator[Path]:
    """Like atomic_dir, but the work goes into `partial_dir(target)`, which outlives a kill, an interrupt or a
    failing machine so that a later run with `resume` continues it (a run without `resume` clears it first). Bad
    input (UserError) removes it: that run cannot be continued."""
    target = Path(target).expanduser().absolute()
    _refuse_early(target)
    _make_parent(target)
    sweep(target)
    work = partial_dir(target)
    if work.exists() and not resume:
        if not (work / RESUME_RECORD).is_file() and any(work.iterdir()):
            raise UserError(f"{work}: exists and is not an interrupted run of this tool; move it away")
        shutil.rmtree(work)
    try:
        work.mkdir(exist_ok=True)
    except OSError as exc:
        raise _translate(exc, target, None) from exc
    try:
        yield work
        (work / RESUME_RECORD).unlink(missing_ok=True)
        _complete(work, target)
    except UserError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    except Exception as exc:
        if _disk_full(exc):
            free = _mb(shutil.disk_usage(target.parent).free)
            raise EnvironmentFault(f"no space left on the disk of {target}: {free} free; free space and run again "
                                   f"with --resume (the finished blocks are kept in {work})") from exc
        if (err := _translate(exc, target, None)) is not exc:
            raise err from exc
        raise


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling file path to write; on success it replaces `target`, on failure it is removed."""
    target = Path(target).expanduser().absolute()
    _refuse_early(target)
    _make_parent(target)
    sweep(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _translate(exc, target, None) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        with _parent_lock(target):
            if not may_replace(target):
                raise UserError(refusal(target))
            os.replace(tmp, target)
    except BaseException as exc:
        written = os.path.getsize(tmp) if _disk_full(exc) and os.path.exists(tmp) else None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, Exception) and (err := _translate(exc, target, written)) is not exc:
            raise err from exc
        raise


def write_text(target: Path, text: str) -> None:
    """Write `text` to `target` through a temporary sibling file and an atomic rename."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: Path, obj: Any, sign: bool = False) -> None:
    """Write `obj` as indented JSON atomically; `sign` adds `written_by` (for files a user names, so a later run
    knows it may replace them)."""
    if sign and isinstance(obj, dict):
        obj = {**obj, "written_by": stamp()["written_by"]}
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_marker(root: Path, files: bool = True) -> None:
    """Write ROOT/.compress-output: who wrote it and (with `files`) each file's byte size and sha256."""
    from compress.integrity import file_records

    body = {**stamp(), "files": file_records(root) if files else None}
    (Path(root) / MARKER).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def ensure_workdir(path: Path) -> Path:
    """Create (or reuse) a directory that a verb fills over time (tune, run): refused unless absent, empty or
    already this tool's; the marker (without file hashes: its contents change) is written on creation."""
    path = Path(path).expanduser().absolute()
    _refuse_early(path)
    if path.is_dir() and (path / MARKER).is_file():
        return path
    _make_parent(path)
    try:
        path.mkdir(exist_ok=True)
        write_marker(path, files=False)
    except OSError as exc:
        raise _translate(exc, path, None) from exc
    return path


def sweep(target: Path) -> list[Path]:
    """Remove temporary siblings of `target` left by runs that died (their PID is gone); return what went. An old
    output set aside by a run killed before its new one was in place (`.NAME.PID.*.old`) is put back instead."""
    target = Path(target).absolute()
    gone = []
    with contextlib.suppress(OSError):
        for p in target.parent.glob(f".{glob_escape(target.name)}.*.old"):
            pid = p.name[len(target.name) + 2:].split(".", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                if not target.exists() and not target.is_symlink():
                    os.rename(p, target)
                else:
                    shutil.rmtree(p, ignore_errors=True)
        for p in target.parent.glob(f".{glob_escape(target.name)}.*.tmp"):
            pid = p.name[len(target.name) + 2:].split(".", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
                gone.append(p)
    return gone


def glob_escape(name: str) -> str:
    """`name` with glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def require_space(target: Path, needed: int) -> None:
    """EnvironmentFault when the filesystem of `target` has less than `needed` bytes free (plus 1%)."""
    probe = nearest_existing(Path(target).parent)
    free = shutil.disk_usage(probe).free
    if free < needed * 1.01:
        raise EnvironmentFault(f"not enough space to write {target}: needs {_mb(needed)}, {_mb(free)} free on "
                               f"{probe}; free some space or pass another --out")


def move_into(src: Path, target: Path) -> None:
    """Put the complete directory `src` at `target` (a sibling) in one step, then delete what was there."""
    target = Path(target).absolute()
    old = _install(Path(src).absolute(), target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _complete(tmp: Path, target: Path) -> None:
    """A finished temporary directory: readable modes, the integrity marker, installed at `target` in one step,
    the output it replaced deleted after."""
    tmp.chmod(0o755)
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    write_marker(tmp)
    fault_point("before-install")
    old = _install(tmp, target)
    fault_point("installed")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _install(tmp: Path, target: Path) -> Path | None:
    """Put `tmp` at `target` in one step; return where the replaced output now is (to delete), or None."""
    with _parent_lock(target):
        if not may_replace(target):
            raise UserError(refusal(target))
        if not target.exists():
            os.rename(tmp, target)
            return None
        if _exchange(tmp, target):
            return tmp
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".old", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)  # no RENAME_EXCHANGE here: the old output is set aside (sweep puts it back if killed)
        os.rename(tmp, target)
        return old


_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where the OS or filesystem lacks it."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def _parent_lock(target: Path) -> Iterator[None]:
    """Serialise the final check-and-rename of writers in one folder (two runs writing the same --out)."""
    fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _refuse_early(target: Path) -> None:
    reason = protected(target)
    if reason:
        raise UserError(f"{target}: refusing to write {reason}; pass a new path")
    if not may_replace(target):
        raise UserError(refusal(target))


def _make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _translate(exc, target, None) from exc


def _translate(exc: Exception, target: Path, written: int | None) -> Exception:
    """A full disk -> EnvironmentFault (exit 1); no permission / read-only -> UserError (exit 2); else `exc`."""
    code = getattr(exc, "errno", None)
    if _disk_full(exc):
        free = shutil.disk_usage(target.parent).free if target.parent.exists() else 0
        wrote = f"{_mb(written)} were written when it filled, " if written else ""
        return EnvironmentFault(f"no space left on the disk of {target}: {wrote}{_mb(free)} free; free more than "
                                "that or pass another --out (nothing was left behind)")
    if code in _NO_WRITE:
        why = "read-only filesystem" if code == errno.EROFS else "permission denied"
        return UserError(f"cannot write {target}: {why}; pass a writable path")
    return exc


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, also as safetensors' Rust error text."""
    text = str(exc)
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text


def fault_point(point: str) -> None:
    """Tests only: die here (SIGKILL) when COMPRESS_FAULT_AT names this point."""
    if os.environ.get(_FAULT_ENV) == point:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tree_bytes(root: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for f in Path(root).rglob("*"):
            with contextlib.suppress(OSError):
                if f.is_file():
                    total += f.stat().st_size
    return total


def _mb(n: int | None) -> str:
    """Bytes for a person: 812 bytes, 40.0 kB, 538.1 MB, 2.1 GB."""
    n = n or 0
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} bytes"
