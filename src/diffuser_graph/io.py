"""Atomic writes: a reader sees the old file or the new one, never half of either.

Every file the package writes (configs, metrics, results, checkpoints, figures) goes through
:func:`atomic_write`: the content is written to a temporary file in the target's folder, flushed
to disk, given the permissions a plain ``open(path, "w")`` would get, and renamed over the target.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)``, then move the finished file to ``path``; returns ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        with temporary.open("rb+") as written:
            os.fsync(written.fileno())
        temporary.chmod(_default_mode())  # mkstemp makes 0600 files; readers expect 0644
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: a crash leaves the previous file intact."""
    import torch

    return atomic_write(path, lambda temporary: torch.save(obj, temporary))


def atomic_save_figure(path: str | os.PathLike, fig: Any, dpi: int = 110) -> Path:
    """``fig.savefig`` (format from the suffix, e.g. PNG) to ``path`` atomically."""
    return atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=dpi))
