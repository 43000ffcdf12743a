"""bitdistill.io: atomic folders and files, output-location checks, signals, stale temporaries, permissions."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bitdistill.errors import UserError
from bitdistill.io import atomic_output_dir, atomic_write, check_output_location, clean_stale_temps


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_success_renames_into_place_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
    finally:
        os.umask(old)
    assert _listing(tmp_path) == ["out"]
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "a.txt").stat().st_mode & 0o777 == 0o644


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
        raise RuntimeError("boom")
    assert _listing(tmp_path) == []


def test_full_disk_is_a_user_error_and_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match="No space left on device"), atomic_output_dir(tmp_path / "out"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert _listing(tmp_path) == []


def test_existing_output_refused_and_kept(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    with pytest.raises(FileExistsError), atomic_output_dir(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / "keep").read_text() == "mine"


def test_output_appearing_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while"), atomic_output_dir(out) as tmp:
        (tmp / "new").write_text("new")
        out.mkdir()  # an empty folder: a plain rename would silently replace it
        (out / "theirs").write_text("theirs")
    assert _listing(out) == ["theirs"]
    assert _listing(tmp_path) == ["out"]


def test_empty_folder_appearing_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError), atomic_output_dir(out):
        out.mkdir()
    assert _listing(out) == []
    assert _listing(tmp_path) == ["out"]


@pytest.mark.parametrize("layout", ["ancestor", "same", "inside"])
def test_output_related_to_source_refused(tmp_path, layout):
    src = tmp_path / "proj" / "student"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    out = {"ancestor": tmp_path / "proj", "same": src, "inside": src / "packed"}[layout]
    with pytest.raises(UserError, match="source"), atomic_output_dir(out, overwrite=True, sources=[src]):
        pass
    assert _listing(src) == ["config.json"]
    assert _listing(tmp_path / "proj") == ["student"]


def test_overwrite_refuses_a_folder_that_is_not_an_output(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="not an output"), atomic_output_dir(tmp_path / "home", overwrite=True):
        pass
    assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_an_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new"
    assert _listing(tmp_path) == ["out"]


def test_dangling_symlink_output_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="symbolic link"), atomic_output_dir(tmp_path / "link"):
        pass
    assert _listing(tmp_path) == ["link"]


def test_stale_temp_of_dead_process_is_removed_and_live_one_refused(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.bitdistill-tmp-{int(dead.stdout)}-0123abcd"
    stale.mkdir()
    assert clean_stale_temps(tmp_path / "out") == [stale]
    assert _listing(tmp_path) == []
    live = tmp_path / f".out.bitdistill-tmp-{os.getppid()}-0123abcd"
    live.mkdir()
    with pytest.raises(UserError, match="another bitdistill process"), atomic_output_dir(tmp_path / "out"):
        pass
    assert _listing(tmp_path) == [live.name]


def test_stale_old_folder_restored_when_output_missing(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f".out.bitdistill-old-{int(dead.stdout)}-0123abcd"
    old.mkdir()
    (old / "config.json").write_text("previous")
    clean_stale_temps(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == "previous"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_temp_folder(tmp_path, sig):
    script = textwrap.dedent(f"""
        import os, signal, sys
        from bitdistill.io import atomic_output_dir
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a foreground process (not a background job)
        try:
            with atomic_output_dir({str(tmp_path / "out")!r}) as tmp:
                (tmp / "big").write_bytes(b"x" * 1000)
                os.kill(os.getpid(), {int(sig)})
        except KeyboardInterrupt as exc:
            sys.exit(type(exc).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.stderr.strip() == ("Terminated" if sig == signal.SIGTERM else "KeyboardInterrupt")
    assert _listing(tmp_path) == []


def test_atomic_write_text_bytes_and_callable(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        atomic_write(tmp_path / "b.bin", b"\x00")
        atomic_write(tmp_path / "c.txt", lambda p: p.write_text("c"))
    finally:
        os.umask(old)
    assert _listing(tmp_path) == ["a.json", "b.bin", "c.txt"]
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "a.json", "{1}", overwrite=False)
    assert (tmp_path / "a.json").read_text() == "{}"


def test_atomic_write_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_text("old")

    def full(p):
        Path(p).write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match=r"a\.json: No space left"):
        atomic_write(tmp_path / "a.json", full)
    assert (tmp_path / "a.json").read_text() == "old"
    assert _listing(tmp_path) == ["a.json"]


def test_check_output_location_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        check_output_location(tmp_path / "f")
