"""Output safety in one place: atomic folders and files, output-location checks, stale temp cleanup.

Every folder or file bitdistill writes goes through :func:`atomic_output_dir` or :func:`atomic_write`:

- the output is written under a temporary name *beside* it (same file system), then renamed into place,
  so it is either absent or complete, never half-written;
- the final rename never replaces something that appeared meanwhile unless ``overwrite`` is set (Linux
  ``renameat2(RENAME_NOREPLACE)``; elsewhere a check just before an ordinary rename);
- the temporary is removed on every exit path, exceptions, Ctrl-C and SIGTERM included (SIGTERM is turned
  into :class:`bitdistill.errors.Terminated` while an output is being written, when no other handler is set);
- temporaries left by a killed run (``kill -9``, power loss) carry its process id; the next write of the same
  output removes them and says so, or refuses while that process still runs;
- a write that fails for a reason the user can fix (full disk, quota, read-only or forbidden location) is one
  :class:`~bitdistill.errors.UserError`, whichever library raised it (:func:`user_error_from_write`);
- folders and files get the permissions of a plain ``mkdir``/``open`` under the user's umask;
- an output folder may not be, contain or sit inside any of its sources, and ``overwrite`` replaces only a
  folder that is empty or holds one of the files its writer produces (``config.json`` for a model).

The guarantee is against process death, not power loss: nothing is ``fsync``-ed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from bitdistill.errors import Terminated, UserError, user_error_from_os

__all__ = ["TEMP_TAG", "atomic_output_dir", "atomic_write", "check_output_location", "clean_stale_temps",
           "rename_noreplace", "user_error_from_write", "write_errno"]

logger = logging.getLogger(__name__)

TEMP_TAG = ".bitdistill-"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.bitdistill-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
# safetensors' Rust writer reports an I/O error as text: "... I/O error: No space left on device (os error 28)".
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")
# Below this much free space a write that failed without saying why is taken for a full disk.
_FULL_DISK_BYTES = 1 << 20
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _temp_path(out: Path, kind: str) -> Path:
    """``<parent>/.<name>.bitdistill-<kind>-<pid>-<random>``: a sibling of ``out`` naming its writer's process."""
    return out.parent / f".{out.name}{TEMP_TAG}{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _umask() -> int:
    """The process umask (read without changing it where ``/proc`` tells it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_permissions(path: Path) -> None:
    """Give ``path`` (and everything under it) the modes a plain ``mkdir``/``open`` would: 0o777 (folders and
    executables) or 0o666, minus the umask.

    Some writers create files 0600 (``mkstemp``, safetensors' own temporary files); outputs must look like any
    other ``save_pretrained`` folder.
    """
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            executable = p.is_dir() or p.stat().st_mode & 0o111
            p.chmod((0o777 if executable else 0o666) & ~mask)


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_temps(out: str | os.PathLike, *, refuse_live: bool = True) -> list[Path]:
    """Remove the temporaries a killed run left beside ``out``; return what was removed (each is logged).

    A temporary whose writer process still runs belongs to a concurrent run: :class:`UserError` when
    ``refuse_live`` (output folders), else it is left alone (single files such as caches, which processes of
    one distributed run may write at the same time with the same content). A stale
    ``old`` folder (a killed ``overwrite`` that had moved the previous output aside) is moved back to ``out``
    when ``out`` is missing, so the previous output is never lost.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    for path in sorted(out.parent.iterdir()):
        m = _TEMP_RE.match(path.name)
        if m is None or m["name"] != out.name or int(m["pid"]) == os.getpid():
            continue
        if _alive(int(m["pid"])):
            if not refuse_live:
                continue
            raise UserError(f"{out} is being written by another bitdistill process (pid {m['pid']}, temporary "
                            f"{path.name}); wait for it to finish or choose another output")
        if m["kind"] == "old" and not os.path.lexists(out):
            os.rename(path, out)
            logger.warning("restored %s from %s (left by a killed run that was replacing it)", out, path.name)
            continue
        _remove(path)
        logger.warning("removed %s, left by a killed bitdistill run (pid %s)", path, m["pid"])
        removed.append(path)
    return removed


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (atomically where the OS can; ``FileExistsError`` if it does)."""
    src, dst = os.fspath(src), os.fspath(dst)
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def check_output_location(out: str | os.PathLike, sources: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output path that is a symlink or not a folder, or that is, contains or sits in a source.

    Raises:
        UserError: naming ``out`` and the source.
    """
    out = Path(out)
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link; pass the real folder path (links are never written through)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another output path")
    target = out.resolve()
    for src in sources:
        src = Path(src)
        if not src.exists():
            continue
        s = src.resolve()
        if target == s or s in target.parents:
            raise UserError(f"output {out} is the source {src} or inside it; choose a folder outside the source "
                            "(a source is never modified)")
        if target in s.parents:
            raise UserError(f"output {out} contains the source {src}; replacing it would delete the source; "
                            "choose another output folder")


def _check_replaceable(out: Path, markers: tuple[str, ...]) -> None:
    if any(out.iterdir()) and not any((out / m).exists() for m in markers):
        raise UserError(f"{out} is not an output of this command (it holds none of {', '.join(markers)}); "
                        "--overwrite only replaces such folders; remove it yourself or choose another path")


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` (if this is the main thread and SIGTERM is at its default)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_errno(exc: BaseException) -> int | None:
    """The ``errno`` behind a failed write where the exception says it: an ``OSError``'s own, the ``(os error N)``
    of safetensors' ``SafetensorError``, or either one along the exception's causes (``torch.save`` into a file
    object raises a ``RuntimeError`` from the ``OSError`` of the file's ``write``); ``None`` if none says."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        if type(current).__name__ == "SafetensorError":
            m = _OS_ERROR_TEXT.search(str(current))
            if m:
                return int(m[1])
        current = current.__cause__ or current.__context__
    return None


def _disk_full(path: Path) -> bool:
    """Whether the file system holding ``path`` has (almost) no space left for this process."""
    statvfs, geteuid = getattr(os, "statvfs", None), getattr(os, "geteuid", None)
    if statvfs is None:
        return False
    try:
        st = statvfs(path)
    except OSError:
        return False
    free = st.f_bfree if geteuid is not None and geteuid() == 0 else st.f_bavail  # root may use reserved blocks
    return free * st.f_frsize < _FULL_DISK_BYTES


def user_error_from_write(exc: BaseException, out: str | os.PathLike, probe: str | os.PathLike | None = None
                          ) -> UserError | None:
    """A one-line :class:`UserError` for a write of ``out`` that failed for a reason the user can fix, else ``None``.

    Args:
        exc: what the writer raised: an ``OSError`` (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``, ...), safetensors'
            ``SafetensorError``, or anything carrying one of these as its cause (see :func:`write_errno`).
        out: the output named in the message.
        probe: a path on the output's file system. Writers whose errors carry no ``errno`` (``torch.save`` to a path
            raises a bare ``RuntimeError`` from its C++ stream; ``numpy.tofile`` an ``OSError`` without one) are
            recognized by that file system having no space left; check it before removing what was written.
    """
    if isinstance(exc, (UserError, FileExistsError)):
        return None
    number = write_errno(exc)
    silent = isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError"
    if number is None and silent and probe is not None and _disk_full(Path(probe)):
        number = errno.ENOSPC
    return None if number is None else user_error_from_os(OSError(number, os.strerror(number)), out)


def _as_user_error(exc: OSError, out: Path) -> BaseException:
    return user_error_from_write(exc, out) or exc


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = False,
                      sources: Iterable[str | os.PathLike] = (),
                      replaceable_if: tuple[str, ...] = ("config.json",)) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out``; when the body succeeds it becomes ``out``.

    Args:
        out: the output folder.
        overwrite: replace an existing ``out`` (only once the new folder is complete, and only a folder that is
            empty or holds one of ``replaceable_if``).
        sources: folders or files the output is made from; ``out`` may not be, contain or sit inside one.
        replaceable_if: file names that mark a folder as an earlier output of the same writer.

    Raises:
        FileExistsError: ``out`` exists (at the start, or appeared meanwhile) and ``overwrite`` is False.
        UserError: a bad location (see :func:`check_output_location`), a concurrent writer, or a write the user
            can fix (full disk, read-only or forbidden location).
    """
    out = Path(out)
    check_output_location(out, sources)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
        _check_replaceable(out, replaceable_if)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out)
        tmp = _temp_path(out, "tmp")
        tmp.mkdir()
    except OSError as exc:
        raise _as_user_error(exc, out) from exc
    with _sigterm_as_exception():
        try:
            yield tmp
            _plain_permissions(tmp)
            _finish(tmp, out, overwrite)
        except BaseException as exc:
            user = user_error_from_write(exc, out, tmp.parent)  # before removing: that frees the space
            _remove(tmp)
            if user is not None:
                raise user from exc
            raise


def _finish(tmp: Path, out: Path, overwrite: bool) -> None:
    if not os.path.lexists(out) or not overwrite:
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise FileExistsError(f"{out} appeared while this run was writing it (another run?); it was left as it "
                                  "is and this run's output discarded; pass --overwrite to replace it") from None
        return
    old = _temp_path(out, "old")
    os.rename(out, old)
    try:
        rename_noreplace(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _remove(old)


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], object], *,
                 overwrite: bool = True) -> Path:
    """Write one file atomically: into a temporary sibling, then rename over ``path``; returns ``path``.

    Args:
        path: the file to write; its folder is created if missing.
        data: text (UTF-8), bytes, or a function that writes the file at the path it is given
            (e.g. ``lambda p: safetensors.torch.save_file(tensors, p)``).
        overwrite: replace an existing ``path`` (``False``: ``FileExistsError`` if it exists, even if it
            appeared while writing).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        UserError: a write the user can fix (full disk, read-only or forbidden location).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass a file path")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path, refuse_live=False)
    except OSError as exc:
        raise _as_user_error(exc, path) from exc
    tmp = _temp_path(path, "tmp")
    with _sigterm_as_exception():
        try:
            if callable(data):
                data(tmp)
            else:
                with open(tmp, "x", encoding="utf-8") if isinstance(data, str) else open(tmp, "xb") as f:
                    f.write(data)
            _plain_permissions(tmp)
            if overwrite:
                os.replace(tmp, path)
            else:
                rename_noreplace(tmp, path)
        except BaseException as exc:
            user = user_error_from_write(exc, path, tmp.parent)
            _remove(tmp)
            if user is not None:
                raise user from exc
            raise
    return path
