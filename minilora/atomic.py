"""Writing files and folders so that a crash never leaves half of one: everything is written under
a temporary name beside its target and fsynced, then renamed over it (a rename is atomic on POSIX),
and the folder that holds it is fsynced so that the rename itself is on disk.

Every writer of minilora goes through here: adapters, checkpoints, metrics.jsonl, GGUF imports.
A write that fails says which file and why ("[Errno 28] No space left on device: '…/x.safetensors'"),
whichever layer failed (Python's io, safetensors' Rust writer).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path


def write_files(files: dict[Path, Callable[[Path], object]]) -> None:
    """Write every `path: write` of `files` atomically: `write(tmp)` fills a new file beside `path`,
    which is fsynced, and only when all are written are they renamed into place, in order. A failure
    while writing leaves the old files as they were, and no temporary file behind.

    With several files, the old version of the last one is deleted before the first rename, so a
    crash between the renames leaves a set without its last file (which readers require), never new
    files next to an old last one. Files get the usual mode (0o666 less the umask), which
    safetensors' save_file would otherwise narrow to 0o600."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, write in files.items():
            tmp = temp_path(path)
            temps.append((tmp, path))
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                mode = os.stat(tmp).st_mode & 0o777
                write(tmp)
                os.chmod(tmp, mode)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            except Exception as e:
                raise write_error(e, path) from e
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    if len(temps) > 1:
        temps[-1][1].unlink(missing_ok=True)
        fsync_dir(temps[-1][1].parent)
    for tmp, path in temps:
        os.replace(tmp, path)
        fsync_dir(path.parent)


def write_error(e: Exception, path: Path) -> Exception:
    """`e`, raised while writing `path`, as an OSError that names `path` and the cause; `e` itself
    when it is no I/O error. safetensors reports a full disk as text ("StorageFull", "os error 28")."""
    code = getattr(e, "errno", None)
    if code is None and re.search(r"No space left|StorageFull|os error 28", str(e)):
        code = errno.ENOSPC
    if code is None:
        return e
    return OSError(code, os.strerror(code), str(path))


def temp_path(path: Path) -> Path:
    """A fresh name beside `path` to write it under: hidden, random, ending in .tmp."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def remove_temporaries(path: Path) -> None:
    """Clean up after writes of `path` that a crash interrupted: its temp_path() siblings go, and an
    old version left at previous(path) by a crash inside replace_folder is removed, or moved back
    when it is the only version."""
    stale = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.tmp")
    for entry in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.fullmatch(entry.name):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if previous(path).exists():
        if path.exists():
            shutil.rmtree(previous(path))
        else:
            os.replace(previous(path), path)
            fsync_dir(path.parent)


def write_folder(folder: Path, files: dict[str, Callable[[Path], object] | None]) -> None:
    """Write `files` (name: write, as write_files; None: no such file) into `folder` as a whole: into
    a fresh sibling folder, then swapped in (replace_folder), so a crash leaves the old folder or the
    new one, each complete, never a mix. The old folder's other entries are carried over as hard
    links (no copy), and its mode."""
    folder = Path(folder).resolve()
    if folder == Path.cwd() or folder in Path.cwd().parents:
        raise ValueError(
            f"{folder} is replaced as a whole when written, so it cannot be the current directory"
        )
    remove_temporaries(folder)
    tmp = temp_path(folder)
    tmp.mkdir(parents=True)
    try:
        if folder.is_dir():
            shutil.copymode(folder, tmp)
            for entry in (e for e in folder.iterdir() if e.name not in files):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link)
                else:
                    _link(entry, tmp / entry.name)
        write_files({tmp / name: write for name, write in files.items() if write is not None})
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def previous(folder: Path) -> Path:
    """Where replace_folder keeps the old version of `folder` while it swaps in the new one."""
    return folder.with_name(f".{folder.name}.old")


def replace_folder(tmp: Path, folder: Path) -> None:
    """Swap the finished folder `tmp` (beside `folder`, its files written with write_files) in as
    `folder`: the old one is renamed to previous(folder), tmp to folder, then the old one is deleted.
    A crash between the two renames leaves the old version whole at previous(folder)."""
    fsync_dir(tmp)
    if folder.exists():
        shutil.rmtree(previous(folder), ignore_errors=True)
        os.replace(folder, previous(folder))
    os.replace(tmp, folder)  # from here on the new folder is the one
    fsync_dir(folder.parent)
    shutil.rmtree(previous(folder), ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
