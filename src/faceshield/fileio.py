"""Atomic file writes: a file appears under its final name complete, or not at all."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

from faceshield.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file (same resolved path, or hard links / bind mounts of one file)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_writable_folder(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there (a probe file, removed at once).

    Raises:
        InputError: one line naming the folder, why, and ``what`` to change.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".faceshield-probe-"):
            pass
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{folder}: is a file, not a folder; choose another {what}") from None
    except OSError as exc:
        raise InputError(f"{folder}: cannot write here ({exc.strerror or exc}); choose another {what}") from None


def check_output_file(path: str | Path, inputs: Sequence[str | Path], option: str) -> Path:
    """Check, before any work, that a command may write the file ``path`` given with ``option``: not a folder, not
    one of the command's ``inputs`` (never overwrite a user's file), in a writable folder (created if needed).

    Raises:
        InputError: one line naming the path and the fix.
    """
    text = str(path)
    path = Path(path)
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise InputError(f"{text}: is a folder; {option} needs a file name, e.g. {path / 'faces.png'}")
    for item in map(Path, inputs):
        if same_file(path, item):
            raise InputError(f"{path}: is an input of this command and would be overwritten; give {option} "
                             "another file name")
    check_writable_folder(path.parent, f"place for {option}")
    return path
