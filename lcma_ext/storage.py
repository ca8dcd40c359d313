"""State on disk: atomic writes, and reads that name the file when it is corrupt.

Every file the package writes (checkpoints, contribution maps, run summaries, configurations,
results) goes through :func:`atomic_save` or :func:`atomic_write_text`: the content is written
to a temporary file in the same folder, flushed, then renamed over the target, so a killed
process leaves either the old file or the new one, never a truncated one. A full disk raises
:class:`DiskFullError`, one line naming the file.

State files carry a checksum of their own content (:func:`stamped`, under :data:`STAMP_KEY`,
with whatever identity the caller adds, e.g. a run's fingerprints); :func:`load_stamped`
recomputes it, so a bit flipped inside a tensor is caught on loading instead of trained on.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "STAMP_KEY",
    "CorruptFileError",
    "DiskFullError",
    "atomic_path",
    "atomic_save",
    "atomic_write_text",
    "content_checksum",
    "load_stamped",
    "load_torch_file",
    "stamped",
]

#: The key of a state dict's stamp: ``{"checksum": ..., **identity}`` (see :func:`stamped`).
STAMP_KEY = "stamp"
#: ``errno`` values of a full disk or an exhausted quota.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class CorruptFileError(ValueError):
    """A state file that exists but cannot be read (truncated, corrupt or of another kind)."""

    def __init__(self, path: str | Path, expected: str, detail: str) -> None:
        self.path = Path(path)
        self.detail = detail
        super().__init__(f"expected {expected} in {str(path)!r}; got {detail}")


class DiskFullError(OSError):
    """The disk (or the quota) filled up while a state file was written; the old file is kept."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(
            errno.ENOSPC,
            f"no space left on the device while writing {str(path)!r} (the previous version of "
            "the file, if any, is kept); free some space and rerun the same command to resume",
        )

    def __str__(self) -> str:
        return str(self.strerror)


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
    except OSError as error:
        if error.errno in _DISK_FULL or _disk_full_cause(error):
            raise DiskFullError(path) from error
        raise
    except RuntimeError as error:  # torch.save reports a failed write as a RuntimeError
        if _disk_full_cause(error) or (_write_failed(error) and _nearly_full(path.parent)):
            raise DiskFullError(path) from error
        if _write_failed(error):
            detail = " ".join(str(error).split())[-120:]
            raise OSError(
                errno.EIO, f"could not write {str(path)!r} ({detail}); rerun the same command"
            ) from error
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


#: Free bytes below which a failed write is put down to a full disk.
_NEARLY_FULL = 16 * 2**20


def _write_failed(error: BaseException) -> bool:
    """True for torch's C++ writer failing to write (it gives no ``errno``)."""
    return "PytorchStreamWriter failed" in str(error) or "file write failed" in str(error)


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL
    except OSError:
        return False


def _disk_full_cause(error: BaseException) -> bool:
    """True when ``error`` or an error it was raised from is a full disk."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            return True
        if "No space left on device" in str(seen):  # torch's C++ writer has no errno
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def content_checksum(value: Any) -> str:
    """A checksum (BLAKE2b, 128 bits, hex) of a state: tensors by dtype, shape and bytes.

    Dicts (in their order), lists and tuples are walked; strings, numbers, ``None`` and
    ``torch.Size`` by their ``repr``; anything else by its type name only. A bit flipped in any
    tensor, a changed number or key changes the checksum; :func:`torch.save` then
    :func:`torch.load` keeps it. The walk's text (every dtype and shape in order) is hashed
    first, then the tensors' bytes, concatenated per device and dtype in the walk's order (a
    checkpoint holds hundreds of small tensors: one copy each would cost more than the hash).

    Example:
        >>> import torch
        >>> state = {"w": torch.zeros(3), "epoch": 2}
        >>> content_checksum(state) == content_checksum({"w": torch.zeros(3), "epoch": 2})
        True
        >>> content_checksum(state) == content_checksum({"w": torch.ones(3), "epoch": 2})
        False
    """
    text: list[str] = []
    tensors: list[torch.Tensor] = []
    _walk(value, text, tensors)
    digest = hashlib.blake2b("".join(text).encode(), digest_size=16)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:  # one concatenation per device and dtype, in the walk's order
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.reshape(-1))
    # ndarray.data is the array's buffer (numpy's stubs type ndarray as one only on Python 3.12+)
    with torch.no_grad():
        for group in groups.values():
            digest.update(torch.cat(group).cpu().view(torch.uint8).numpy().data)
    return digest.hexdigest()


#: Values hashed by their ``repr``.
_PLAIN = (str, bytes, int, float, bool, type(None), torch.Size)


def _walk(value: Any, text: list[str], tensors: list[torch.Tensor]) -> None:
    """Append ``value``'s structure to ``text`` and its non-empty tensors to ``tensors``."""
    kind = type(value)  # exact types first (it runs per checkpoint, over hundreds of entries)
    if kind is dict:
        text.append(f"D{len(value)};")
        for key, item in value.items():
            _walk(key, text, tensors)
            _walk(item, text, tensors)
    elif kind is torch.Tensor or kind is torch.nn.Parameter:
        text.append(f"T{value.dtype}{value.shape};")
        if value.numel():
            tensors.append(value)
    elif kind is list or kind is tuple:
        text.append(f"L{len(value)};")
        for item in value:
            _walk(item, text, tensors)
    elif kind in _PLAIN:
        text.append(f"{kind.__name__}:{value!r};")
    elif isinstance(value, torch.Tensor):
        _walk(value.as_subclass(torch.Tensor), text, tensors)
    elif isinstance(value, Mapping):
        _walk(dict(value), text, tensors)
    elif isinstance(value, (list, tuple)):
        _walk(list(value), text, tensors)
    elif isinstance(value, _PLAIN):
        text.append(f"{kind.__name__}:{value!r};")
    else:
        text.append(f"O{kind.__qualname__};")


def stamped(state: Mapping[str, Any], identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``state`` with a stamp: ``{**identity, "checksum": content_checksum(state)}``.

    Args:
        state: A dict state (the stamp's key :data:`STAMP_KEY` must not be in it).
        identity: What else the stamp records (e.g. a run's fingerprints); plain values.
    """
    if STAMP_KEY in state:
        raise ValueError(f"expected a state without the key {STAMP_KEY!r}; got one with it")
    return {**state, STAMP_KEY: {**(identity or {}), "checksum": content_checksum(state)}}


def load_stamped(
    path: str | Path,
    expected: str,
    map_location: str | torch.device = "cpu",
    weights_only: bool = True,
) -> tuple[Any, dict[str, Any] | None]:
    """``(state, stamp)`` of a file written by ``atomic_save(stamped(...))``, checksum verified.

    A file without a stamp (an earlier version's) gives ``stamp=None``; the state is returned
    without the stamp's key.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CorruptFileError: if it cannot be read, or its content does not match its checksum.
    """
    state = load_torch_file(path, expected, map_location, weights_only)
    if not isinstance(state, dict) or STAMP_KEY not in state:
        return state, None
    state = dict(state)
    stamp = state.pop(STAMP_KEY)
    if not isinstance(stamp, dict) or stamp.get("checksum") != content_checksum(state):
        raise CorruptFileError(
            path, expected, "content that does not match its checksum (changed on disk)"
        )
    return state, stamp


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
