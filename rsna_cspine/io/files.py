"""Small file helpers shared by every writer: atomic files and content checksums.

Every output that a reader (a resumed run, another process, a person) may open while it is being made
goes through :func:`atomic_open`: text tables, ledgers, ``np.savez`` archives and ``torch.save``
checkpoints alike. The standard library has no atomic replace-on-close file, so this is the one place
that writes the temporary file, flushes it to disk and renames it over the destination.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open ``path`` for writing so that a reader sees the old file or the whole new one, never a part.

    What is written goes to a hidden temporary file in the same folder (``.<name>.<random>.tmp``); when
    the block ends without an exception it is flushed to disk and renamed over ``path`` (a rename within
    one file system is atomic). On an exception the temporary file is removed and ``path`` is left as
    it was. The folder is created if needed. Binary handles take ``np.savez``/``np.savez_compressed``
    and ``torch.save`` directly.

    Args:
        path: destination file.
        mode: ``"w"`` (UTF-8 text, newlines written as given) or ``"wb"`` (bytes).

    Yields:
        The open file handle.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes new files only: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        with os.fdopen(handle, mode, **text) as tmp:
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only; these are ordinary output files
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_open`.

    Args:
        path: destination file.
        text: its full content.

    Returns:
        The written path.
    """
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks.

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
