"""Files written whole or not at all: a temporary file next to the target, renamed into place.

A run that fails (or is killed) while writing leaves the previous file, or none, never half of one.

Example::

    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
    >>> save_atomically({"w": torch.ones(2)}, path)
    >>> torch.load(path)["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Any

import torch


def write_atomically(path: str, parts: list[bytes]) -> None:
    """Write ``parts`` to a temporary file next to ``path`` and rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
        # mkstemp creates the file private (0600); give it the permissions open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_atomically(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through :func:`write_atomically` (creating the directory if needed)."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, [buffer.getvalue()])
