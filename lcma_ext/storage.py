"""State on disk: atomic writes, and reads that name the file when it is corrupt.

Every file the package writes (checkpoints, contribution maps, run summaries, configurations,
results) goes through :func:`atomic_save` or :func:`atomic_write_text`: the content is written
to a temporary file in the same folder, flushed, then renamed over the target, so a killed
process leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["CorruptFileError", "atomic_path", "atomic_save", "atomic_write_text", "load_torch_file"]


class CorruptFileError(ValueError):
    """A state file that exists but cannot be read (truncated, corrupt or of another kind)."""

    def __init__(self, path: str | Path, expected: str, detail: str) -> None:
        self.path = Path(path)
        super().__init__(f"expected {expected} in {str(path)!r}; got {detail}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` on success.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "state.pt"
        ...     with atomic_path(path) as tmp:
        ...         torch.save({"x": 1}, tmp)
        ...     torch.load(path)
        {'x': 1}
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def load_torch_file(
    path: str | Path,
    expected: str,
    map_location: str | torch.device = "cpu",
    weights_only: bool = True,
) -> Any:
    """``torch.load`` that names the file when it cannot be read.

    Args:
        path: The file.
        expected: What the file should hold, for the message (e.g. "an lcma-ext checkpoint").
        map_location: As ``torch.load``.
        weights_only: As ``torch.load``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CorruptFileError: if it exists but ``torch.load`` cannot read it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected {expected} in {str(path)!r}; got no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        detail = " ".join(str(error).split())[:200]
        raise CorruptFileError(
            path, expected, f"a corrupt or truncated file ({type(error).__name__}: {detail})"
        ) from error
