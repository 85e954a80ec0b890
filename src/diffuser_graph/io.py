"""Files in and out: UTF-8 text read with errors that name the line, and atomic writes.

Every file the package writes (configs, metrics, results, checkpoints, figures) goes through
:func:`atomic_write`: the content is written to a temporary file in the target's folder, flushed
to disk, given the permissions a plain ``open(path, "w")`` would get, and renamed over the target,
so a reader sees the old file or the new one, never half of either.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A file that cannot be used; the message names the file and, where there is one, the line."""

    def __init__(self, path: Path | str, line: int | None, problem: str) -> None:
        self.path, self.line, self.problem = path, line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (``~`` expanded, a leading BOM dropped); a missing file, a folder or
    bytes that are not UTF-8 raise :class:`DataError` naming the file (and line)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(path, None, "is a folder, not a file")
    if not path.is_file():
        raise DataError(path, None, "file does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(path, line, f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                                    f"{err.start}: {err.reason})") from None


def read_rows(path: str | os.PathLike, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` for each non-blank row of a CSV/TSV file (UTF-8, any BOM dropped);
    fields may be of any length (long documents are the point), quoted fields may span lines
    (``line`` is where the row ends)."""
    text = read_text(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the default, 131072, is one short review
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    for row in reader:
        if any(field.strip() for field in row):
            yield reader.line_num, row


def check_output_path(path: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = ()
                      ) -> Path:
    """``path`` if a file can be written there, checked before any work: not a folder, not one
    of ``inputs`` (an output never overwrites an input), and inside a folder that exists or can
    be made. Raises ``ValueError`` naming the path."""
    raw = os.fspath(path)
    path = Path(raw).expanduser()
    if raw.endswith(os.sep) or path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name")
    for source in inputs:
        if path.resolve() == Path(source).expanduser().resolve():
            raise ValueError(f"{path} is an input of this command; writing there would destroy "
                             f"it")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {ancestor} is not a writable folder")
    return path


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
    """``fig.savefig`` to ``path`` atomically; the suffix names the format (``.png``, ``.pdf``,
    ``.svg``)."""
    if not Path(path).suffix:
        raise ValueError(f"{path}: a figure file needs a suffix that names its format, e.g. .png")
    return atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=dpi))
