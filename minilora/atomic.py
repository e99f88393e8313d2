"""Writing files and folders so that a crash never leaves half of one: everything is written under
a temporary name beside its target and fsynced, then renamed over it (a rename is atomic on POSIX),
and the folder that holds it is fsynced so that the rename itself is on disk.

Every writer of minilora goes through here: adapters, checkpoints, metrics.jsonl, GGUF imports.
"""

from __future__ import annotations

import os
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
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            mode = os.stat(tmp).st_mode & 0o777
            write(tmp)
            os.chmod(tmp, mode)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    if len(temps) > 1:
        temps[-1][1].unlink(missing_ok=True)
        _fsync_dir(temps[-1][1].parent)
    for tmp, path in temps:
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def temp_path(path: Path) -> Path:
    """A fresh name beside `path` to write it under: hidden, random, ending in .tmp."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def previous(folder: Path) -> Path:
    """Where replace_folder keeps the old version of `folder` while it swaps in the new one."""
    return folder.with_name(f".{folder.name}.old")


def replace_folder(tmp: Path, folder: Path) -> None:
    """Swap the finished folder `tmp` (beside `folder`, its files written with write_files) in as
    `folder`: the old one is renamed to previous(folder), tmp to folder, then the old one is deleted.
    A crash between the two renames leaves the old version whole at previous(folder)."""
    _fsync_dir(tmp)
    if folder.exists():
        shutil.rmtree(previous(folder), ignore_errors=True)
        os.replace(folder, previous(folder))
    os.replace(tmp, folder)  # from here on the new folder is the one
    _fsync_dir(folder.parent)
    shutil.rmtree(previous(folder), ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
