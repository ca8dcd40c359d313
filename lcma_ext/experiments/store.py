"""The run store: the files of a run folder, written atomically and verified when read.

A run folder (``out``) holds::

    provenance.json             what the run was made from (:class:`Provenance`)
    config.json                 the configuration (a rerun must match it)
    runs/nms.json               NMS pre-training summary
    runs/<arm>_seed<k>.json     one finished run: test bits/dim, flags, curves
    runs/contributions.json     seconds of the contribution estimation
    checkpoints/nms.pt          NMS flow (with the metadata ``lcma-ext contributions`` needs)
    checkpoints/<arm>_seed<k>.pt  model, optimizer, epoch, random state (after every epoch)
    checkpoints/phases/         per-phase files of arms that train themselves (lcma-self ...)
    contributions.pt            the NMS contribution maps
    results.json, results.md    the comparison, and its figures (PNG)

:class:`RunStore` reads and writes them. Every file is written to a temporary file in the same
folder and renamed over the target, so an interrupted write never leaves a truncated file; a
full disk stops with one line naming the file (:class:`lcma_ext.storage.DiskFullError`).

**Fingerprints.** ``provenance.json`` records a :class:`RunIdentity`: a fingerprint of
``config.json``, content fingerprints of the training and test images actually used (after
``limit``), the launcher (a plain process or ``torchrun``) and the world size; and, for the
reader, the absolute ``.npz`` path or image root and the channel count. Every state file
(checkpoints, phase files, ``contributions.pt``, run summaries) carries that identity and a
checksum of its own content, tensors included (:func:`lcma_ext.storage.stamped`). A rerun,
``evaluate``, ``sample`` and ``interpolate`` verify them: other data, another launcher, a file
of another run or a file changed on disk stops with one line (:class:`RunMismatchError`,
:class:`StateFileError`) naming the file, what differs, and what to do.

**Earlier versions.** A folder without ``provenance.json`` (written before fingerprints) still
resumes and is still read, with a one-line warning that its files are unverified; a rerun adds
``provenance.json`` (marked ``unverified_files``) and stamps every file it writes from then on.
Its ``results.json`` and run summaries read as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lcma_ext.distributed import barrier, launched_by_torchrun, world
from lcma_ext.storage import (
    STAMP_KEY,
    CorruptFileError,
    atomic_path,
    atomic_write_text,
    content_checksum,
    load_stamped,
)

if TYPE_CHECKING:
    from nflows.flows import Flow

    from lcma_ext.contributions import ContributionMaps
    from lcma_ext.data import ImageDataset
    from lcma_ext.experiments.config import ExperimentConfig

__all__ = [
    "PROVENANCE",
    "ExperimentError",
    "NMSDivergedError",
    "Provenance",
    "RunIdentity",
    "RunMismatchError",
    "RunStore",
    "StateFileError",
    "atomic_path",
    "build_nms_flow",
    "config_fingerprint",
    "current_launch",
    "data_fingerprints",
    "data_source",
    "foreign_weights",
    "json_roundtrip",
    "load_weights",
    "read_json",
    "strict_json",
    "warn",
    "write_json",
    "write_text",
]

#: The file of a run folder that records what it was made from.
PROVENANCE = "provenance.json"
#: Version of ``provenance.json`` and of the stamps of state files.
FORMAT = 1
#: Folders of earlier versions already warned about in this process (one warning each).
_WARNED: set[Path] = set()


class ExperimentError(ValueError):
    """A user-facing error of an experiment (the command line prints it as one line)."""


class StateFileError(ExperimentError):
    """A file of the run folder is corrupt or truncated."""

    def __init__(self, path: str | Path, error: BaseException | str) -> None:
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        reason = " ".join(str(reason).split())
        if len(reason) > 160:
            reason = reason[:157] + "..."
        self.path = Path(path)
        super().__init__(
            f"{str(path)!r} is corrupt or truncated ({reason}); delete it and rerun the same "
            "command to redo that step"
        )


class RunMismatchError(ExperimentError):
    """A run folder, or a file in it, was made from other data, settings or another launcher."""


class NMSDivergedError(ExperimentError):
    """The NMS pre-training diverged (its contributions would choose the LCMA splits)."""


def warn(text: str) -> None:
    """Print ``lcma-ext: warning: <text>`` to stderr (on the main process only)."""
    if world().is_main:
        print(f"lcma-ext: warning: {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# JSON files


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_text(path, text)


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinities) replaced by ``None``.

    Dicts, lists and tuples are converted element-wise (tuples become lists), anything else is
    returned as it is. Strict JSON has no ``NaN`` or ``Infinity`` token; ``null`` stands for
    a value that is not a finite number (a diverged run, a statistic of too few seeds).
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as indented strict JSON to ``path`` atomically (non-finite: ``null``).

    Raises:
        ValueError: for a value ``json`` cannot write (after :func:`strict_json`).
    """
    write_text(path, json.dumps(strict_json(value), indent=2, allow_nan=False))


def read_json(path: str | Path) -> Any:
    """Read a JSON state file; :class:`StateFileError` when it is corrupt or truncated."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StateFileError(path, error) from error


def json_roundtrip(value: Any) -> Any:
    """``value`` as :func:`write_json` stores it and :func:`read_json` reads it back."""
    return json.loads(json.dumps(strict_json(value), allow_nan=False))


# ----------------------------------------------------------------------------------------------
# fingerprints


def _hexdigest(*parts: bytes | memoryview) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def config_fingerprint(record: Mapping[str, Any]) -> str:
    """The fingerprint of a ``config.json`` record (its canonical JSON, keys sorted)."""
    canonical = json.dumps(json_roundtrip(dict(record)), sort_keys=True, allow_nan=False)
    return _hexdigest(canonical.encode())


def _images_fingerprint(images: torch.Tensor) -> str:
    flat = images.detach().to("cpu").contiguous().reshape(-1)
    header = f"{images.dtype}{tuple(images.shape)}".encode()
    # ndarray.data: its buffer (numpy's stubs type ndarray as one only on Python 3.12+)
    return _hexdigest(header, flat.view(torch.uint8).numpy().data)


def data_fingerprints(data: ImageDataset) -> tuple[str, str]:
    """Content fingerprints (BLAKE2b of dtype, shape and bytes) of the training and test images.

    Computed on the data actually used (after ``limit``): replacing the content of a file, or
    half the images of a folder, changes them even when the counts and shapes stay.
    """
    return _images_fingerprint(data.train), _images_fingerprint(data.test)


def data_source(dataset: str, data_root: str | Path | None) -> str:
    """Where the images come from: the absolute ``.npz`` path or data root, or the name."""
    from lcma_ext.data import npz_path

    path = npz_path(dataset)
    if path is not None:
        return str(Path(path).expanduser().resolve())
    if data_root is not None:
        return str(Path(data_root).expanduser().resolve())
    return dataset


def current_launch() -> tuple[str, int]:
    """``(launcher, world size)`` of this process: ``"plain"`` or ``"torchrun"``."""
    return ("torchrun" if launched_by_torchrun() else "plain"), world().size


def _launch_words(launcher: str, world_size: int) -> str:
    if launcher == "plain":
        return "a plain process"
    return f"torchrun with world size {world_size}"


def _launch_advice(launcher: str, world_size: int) -> str:
    if launcher == "plain":
        return "rerun it without torchrun"
    return f"rerun it under torchrun with {world_size} processes in all"


@dataclass(frozen=True)
class RunIdentity:
    """What every state file of a run folder must have been made with.

    Attributes:
        config: :func:`config_fingerprint` of ``config.json``.
        train_data, test_data: :func:`data_fingerprints` of the images used.
        launcher: ``"plain"`` or ``"torchrun"``.
        world_size: Number of processes.
    """

    config: str
    train_data: str
    test_data: str
    launcher: str
    world_size: int

    def stamp(self) -> dict[str, Any]:
        """The identity part of a state file's stamp (plain values)."""
        return {
            "format": FORMAT,
            "config": self.config,
            "train_data": self.train_data,
            "test_data": self.test_data,
            "launcher": self.launcher,
            "world_size": self.world_size,
        }

    def differences(self, stamp: Mapping[str, Any]) -> list[str]:
        """What a file's ``stamp`` says differently, in words (empty when it matches)."""
        found = []
        if stamp.get("config") != self.config:
            found.append("another configuration")
        if stamp.get("train_data") != self.train_data:
            found.append("other training images")
        if stamp.get("test_data") != self.test_data:
            found.append("other test images")
        launch = (stamp.get("launcher"), stamp.get("world_size"))
        if launch != (self.launcher, self.world_size):
            launcher, size = str(launch[0]), int(launch[1] or 0)
            found.append(f"another launcher ({_launch_words(launcher, size)})")
        return found


@dataclass(frozen=True)
class Provenance:
    """``provenance.json``: the :class:`RunIdentity`, and where the data came from.

    Attributes:
        identity: The fingerprints every state file must match.
        source: Absolute ``.npz`` path or data root (the dataset name for embedded data).
        channels: Channels of the images (``C`` of ``C x H x W``).
        unverified_files: The folder was started by an earlier version: files without a stamp
            are used unverified.
    """

    identity: RunIdentity
    source: str
    channels: int
    unverified_files: bool = False

    def to_json(self) -> dict[str, Any]:
        """The content of ``provenance.json``."""
        identity = self.identity
        return {
            "format": FORMAT,
            "config_fingerprint": identity.config,
            "data": {
                "source": self.source,
                "channels": self.channels,
                "train_fingerprint": identity.train_data,
                "test_fingerprint": identity.test_data,
            },
            "launcher": identity.launcher,
            "world_size": identity.world_size,
            "unverified_files": self.unverified_files,
        }

    @classmethod
    def from_json(cls, value: Any, path: Path) -> Provenance:
        """Read :meth:`to_json`'s content; :class:`StateFileError` naming ``path`` otherwise."""
        try:
            data = value["data"]
            identity = RunIdentity(
                config=str(value["config_fingerprint"]),
                train_data=str(data["train_fingerprint"]),
                test_data=str(data["test_fingerprint"]),
                launcher=str(value["launcher"]),
                world_size=int(value["world_size"]),
            )
            return cls(
                identity,
                str(data["source"]),
                int(data["channels"]),
                bool(value["unverified_files"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise StateFileError(path, f"not a provenance record ({error!r})") from error


# ----------------------------------------------------------------------------------------------
# the NMS flow


def build_nms_flow(model: str, size: str, shape: tuple[int, int, int], levels: int) -> Flow:
    """The untrained NMS flow of a run, as the runner builds it (the one place it is built).

    ``levels`` levels of ``model`` / ``size`` on images of ``shape``, no split
    (:func:`lcma_ext.pipeline.build_nms_transform`), in an nflows ``Flow`` with a standard
    normal base. Its weights come from torch's global generator: seed it first (the runner
    uses ``torch.manual_seed(0)``), or fork it to leave it alone.

    Shapes:
        shape: ``(C, H, W)`` of the images.
    """
    from lcma_ext.models import build_flow, make_level_factory
    from lcma_ext.pipeline import build_nms_transform

    factory = make_level_factory(model, size)
    return build_flow(build_nms_transform(factory, shape, levels), shape)


# ----------------------------------------------------------------------------------------------
# the store


class RunStore:
    """The files of one run folder, with their fingerprints checked.

    Use :meth:`create` to start or resume a run (it writes or checks ``config.json`` and
    ``provenance.json``), :meth:`open` to read a finished folder. Then :meth:`load_state`,
    :meth:`save_state`, :meth:`read_summary`, :meth:`write_summary`, :meth:`load_maps` and
    :meth:`save_maps` verify and stamp every state file.

    Args:
        root: The run folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.provenance: Provenance | None = None

    # -- paths --------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """``config.json``."""
        return self.root / "config.json"

    @property
    def provenance_path(self) -> Path:
        """``provenance.json``."""
        return self.root / PROVENANCE

    def summary_path(self, name: str) -> Path:
        """``runs/<name>.json`` (``name``: ``nms``, ``<arm>_seed<k>``)."""
        return self.root / "runs" / f"{name}.json"

    def checkpoint_path(self, name: str) -> Path:
        """``checkpoints/<name>.pt``."""
        return self.root / "checkpoints" / f"{name}.pt"

    @property
    def maps_path(self) -> Path:
        """``contributions.pt``."""
        return self.root / "contributions.pt"

    @property
    def identity(self) -> RunIdentity | None:
        """The folder's identity (``None`` for a folder of an earlier version being read)."""
        return None if self.provenance is None else self.provenance.identity

    @property
    def verified(self) -> bool:
        """False when files without a stamp are accepted (a folder of an earlier version)."""
        return self.provenance is not None and not self.provenance.unverified_files

    # -- opening ------------------------------------------------------------------------------

    def create(self, record: dict[str, Any], provenance: Provenance, writes: bool) -> None:
        """Start or resume a run: create the folder, check or write the two records.

        Args:
            record: The run's ``config.json`` record.
            provenance: The run's identity and data source (computed from the loaded data).
            writes: Whether this process writes the folder (rank 0).

        Raises:
            ExperimentError: for an unusable folder or a folder of another configuration.
            RunMismatchError: for a folder made from other data or with another launcher.
        """
        self._make_folder()
        stored_config = self._stored_record() if self.config_path.is_file() else None
        if stored_config is not None:
            _check_same_config(self.config_path, stored_config, record, self.root)
        if self.provenance_path.is_file():
            stored = Provenance.from_json(read_json(self.provenance_path), self.provenance_path)
            self._check_same_run(stored, provenance)
            self.provenance = stored
        else:
            legacy = stored_config is not None
            if legacy:
                warn(
                    f"{str(self.root)!r} was started by an earlier version of lcma-ext, without "
                    "fingerprints: its existing files are used unverified"
                )
            self.provenance = Provenance(
                provenance.identity, provenance.source, provenance.channels, legacy
            )
            barrier()  # every rank has looked before rank 0 writes
            if writes:
                write_json(self.provenance_path, self.provenance.to_json())
        if stored_config is None and writes:
            write_json(self.config_path, record)
        barrier()

    @classmethod
    def open(cls, root: str | Path) -> RunStore:
        """A finished (or unfinished) run folder, to read.

        Raises:
            ExperimentError: without ``config.json``.
            StateFileError: for a corrupt ``config.json`` or ``provenance.json``, or one that
                does not belong to the other.
        """
        store = cls(root)
        if not store.root.is_dir() or not store.config_path.is_file():
            raise ExperimentError(
                f"expected a run folder of lcma-ext run or ablate-levels; got {str(root)!r} "
                "without config.json"
            )
        if store.provenance_path.is_file():
            store.provenance = Provenance.from_json(
                read_json(store.provenance_path), store.provenance_path
            )
            if store.provenance.identity.config != config_fingerprint(store._stored_record()):
                raise RunMismatchError(
                    f"expected {str(store.config_path)!r} to be the configuration recorded in "
                    f"{str(store.provenance_path)!r}; got another one (edited or copied in): "
                    "restore it from results.json's 'config'"
                )
        elif store.root.resolve() not in _WARNED:
            _WARNED.add(store.root.resolve())
            warn(
                f"{str(store.root)!r} was written by an earlier version of lcma-ext, without "
                "fingerprints: its files and data are used unverified"
            )
        return store

    def _make_folder(self) -> None:
        out = self.root
        try:
            out.mkdir(parents=True, exist_ok=True)
            if not os.access(out, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
        except OSError as error:
            reason = error.strerror or str(error)
            if isinstance(error, FileExistsError) or (out.exists() and not out.is_dir()):
                reason = "a file, not a folder"
            raise ExperimentError(
                f"expected --out to be a folder this user can write; got {str(out)!r} ({reason})"
            ) from None

    def _stored_record(self) -> dict[str, Any]:
        record = read_json(self.config_path)
        if not isinstance(record, dict):
            raise StateFileError(self.config_path, "not a JSON object")
        return record

    def _check_same_run(self, stored: Provenance, new: Provenance) -> None:
        old, now, path = stored.identity, new.identity, str(self.provenance_path)
        if old.config != now.config:  # config.json matched, or was missing
            raise RunMismatchError(
                f"expected the configuration recorded in {path!r}; got another one (its "
                f"config.json was deleted or edited): choose another --out"
            )
        for which, before, after in (
            ("training", old.train_data, now.train_data),
            ("test", old.test_data, now.test_data),
        ):
            if before != after:
                raise RunMismatchError(
                    f"expected the {which} images this run folder was made from (fingerprint "
                    f"{before[:12]} in {path!r}, from {stored.source}); got other {which} images "
                    f"(fingerprint {after[:12]}, from {new.source}): restore that data, or "
                    "choose another --out"
                )
        if (old.launcher, old.world_size) != (now.launcher, now.world_size):
            raise RunMismatchError(
                f"expected this run folder to go on as it was started, as "
                f"{_launch_words(old.launcher, old.world_size)} ({path!r}); got "
                f"{_launch_words(now.launcher, now.world_size)}: "
                f"{_launch_advice(old.launcher, old.world_size)}, or choose another --out"
            )

    def stored_config(self, **overrides: Any) -> tuple[dict[str, Any], ExperimentConfig]:
        """``(record, config)`` of ``config.json`` (``out`` is this folder, no progress)."""
        from lcma_ext.experiments.config import ExperimentConfig

        record = self._stored_record()
        options = {"out": self.root, "progress": False, **overrides}
        try:
            config = ExperimentConfig.from_record(record, **options)
        except (KeyError, TypeError) as error:
            raise StateFileError(self.config_path, f"missing {error}") from error
        return record, config

    # -- verification -------------------------------------------------------------------------

    def verify(self, path: Path, stamp: Mapping[str, Any] | None) -> None:
        """Check a state file's stamp against the folder's identity.

        Raises:
            RunMismatchError: a file of another run, or without a stamp in a verified folder.
        """
        identity = self.identity
        if stamp is None:
            if not self.verified:
                return
            raise RunMismatchError(
                f"{str(path)!r} carries no fingerprint of this run folder (a file of an earlier "
                "version, or copied in); delete it and rerun the same command to redo that step"
            )
        if identity is None:  # an earlier version's folder: no identity to compare with
            return
        found = identity.differences(stamp)
        if found:
            raise RunMismatchError(
                f"{str(path)!r} belongs to another run ({', '.join(found)} than "
                f"{str(self.provenance_path)!r}); delete it and rerun the same command to redo "
                "that step"
            )

    def check_data(self, data: ImageDataset, given: str) -> None:
        """Refuse images other than the run's (for ``evaluate`` and ``interpolate``)."""
        if self.provenance is None:
            return
        identity = self.provenance.identity
        train, test = data_fingerprints(data)
        path, source = str(self.provenance_path), self.provenance.source
        for which, before, after in (
            ("training", identity.train_data, train),
            ("test", identity.test_data, test),
        ):
            if before != after:
                raise RunMismatchError(
                    f"expected the {which} images this run was made from (fingerprint "
                    f"{before[:12]} in {path!r}, from {source}); got other "
                    f"{which} images (fingerprint {after[:12]}, from {given}): restore that "
                    "data, or pass --data-root of the run's data"
                )

    # -- state files --------------------------------------------------------------------------

    @property
    def stamp(self) -> dict[str, Any] | None:
        """The identity every file written now carries (``None`` before :meth:`create`)."""
        identity = self.identity
        return None if identity is None else identity.stamp()

    def load_state(self, path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
        """A checkpoint or phase file, checksum and fingerprints verified.

        Raises:
            ExperimentError: when it does not exist.
            StateFileError: when it is corrupt, truncated or changed on disk.
            RunMismatchError: when it belongs to another run.
        """
        if not path.is_file():
            raise ExperimentError(f"expected a checkpoint file; got {str(path)!r} (not found)")
        try:
            state, stamp = load_stamped(
                path, "a checkpoint written by save_checkpoint", device, weights_only=False
            )
        except CorruptFileError as error:
            raise StateFileError(path, error.__cause__ or error.detail) from error
        if not isinstance(state, dict):
            raise StateFileError(path, "not a checkpoint of lcma-ext")
        self.verify(path, stamp)
        return state

    def save_state(self, path: Path, state: Mapping[str, Any]) -> None:
        """Write a checkpoint or phase file with the folder's stamp (atomically)."""
        from lcma_ext.training import save_checkpoint

        save_checkpoint(path, identity=self.stamp, **state)

    def read_summary(self, path: Path) -> dict[str, Any]:
        """A run summary, verified; its ``test_bpd`` a float (JSON ``null``: NaN).

        Raises:
            StateFileError: when it is corrupt, not a summary, or changed on disk.
            RunMismatchError: when it belongs to another run.
        """
        summary = read_json(path)
        if not isinstance(summary, dict) or "test_bpd" not in summary:
            raise StateFileError(path, "not a run summary")
        stamp = summary.pop(STAMP_KEY, None)
        if stamp is not None and (
            not isinstance(stamp, dict) or stamp.get("checksum") != content_checksum(summary)
        ):
            raise StateFileError(path, "content that does not match its checksum")
        self.verify(path, stamp)
        if summary["test_bpd"] is None:
            summary["test_bpd"] = math.nan
        return summary

    def write_summary(self, path: Path, summary: Mapping[str, Any]) -> None:
        """Write a run summary (strict JSON) with the folder's stamp."""
        plain = json_roundtrip(dict(summary))
        stamp = {**(self.stamp or {}), "checksum": content_checksum(plain)}
        write_json(path, {**plain, STAMP_KEY: stamp})

    def load_maps(self) -> ContributionMaps:
        """``contributions.pt``, verified (and checked to track, before any arm uses it)."""
        from lcma_ext.contributions import ContributionMaps

        path = self.maps_path
        if not path.is_file():
            raise ExperimentError(f"expected {str(path)!r} from the NMS step; got no such file")
        try:
            _, stamp = load_stamped(path, "an lcma-ext contributions file")
            self.verify(path, stamp)
            return ContributionMaps.load(path)
        except CorruptFileError as error:
            raise StateFileError(path, error.__cause__ or error.detail) from error

    def save_maps(self, maps: ContributionMaps) -> None:
        """Write ``contributions.pt`` with the folder's stamp."""
        maps.save(self.maps_path, self.stamp)

    def nms_meta(self) -> dict[str, Any]:
        """The metadata of ``checkpoints/nms.pt`` (empty without one)."""
        checkpoint = self.checkpoint_path("nms")
        if not checkpoint.is_file():
            return {}
        return self.load_state(checkpoint).get("meta") or {}

    def load_nms(self, config: ExperimentConfig, shape: tuple[int, int, int], levels: int) -> Flow:
        """The NMS flow of ``checkpoints/nms.pt`` with its evaluation weights, in eval mode.

        Torch's global random state is left as it was.
        """
        with torch.random.fork_rng(devices=[]):
            flow = build_nms_flow(config.model, config.size, shape, levels)
        load_weights(
            flow, self.load_state(self.checkpoint_path("nms")), self.checkpoint_path("nms")
        )
        return flow.to(config.torch_device).eval()


def load_weights(flow: torch.nn.Module, state: Mapping[str, Any], path: Path) -> None:
    """Load a checkpoint's evaluation weights into ``flow``; :func:`foreign_weights` when they
    are another model's (e.g. a Glow ``nms.pt`` in a RealNVP folder of an earlier version)."""
    from lcma_ext.training import evaluation_state_dict

    try:
        flow.load_state_dict(evaluation_state_dict(dict(state)))
    except (RuntimeError, KeyError) as error:
        raise foreign_weights(path, error) from None


def foreign_weights(path: Path, error: BaseException) -> RunMismatchError:
    """The one-line error of a checkpoint whose weights do not fit the flow rebuilt for it."""
    text = str(error).strip()
    first = text.splitlines()[0].rstrip(":.") if text else type(error).__name__
    return RunMismatchError(
        f"{str(path)!r} holds the weights of another model ({first}); delete it and rerun the "
        "same command to redo that step"
    )


def _check_same_config(
    path: Path, stored: dict[str, Any], record: dict[str, Any], out: Path
) -> None:
    """Refuse a rerun with another configuration than ``config.json``'s (one line, a hint)."""
    from lcma_ext.experiments.config import recipe_options, stored_recipe
    from lcma_ext.training import RECIPE_FIELDS

    if stored == json_roundtrip(record):
        return
    changed = sorted(k for k in set(stored) | set(record) if stored.get(k) != record.get(k))
    hint = "choose another --out"
    if set(changed) & set(RECIPE_FIELDS):
        options = recipe_options(stored_recipe(stored))
        hint = f"{options} reproduces its training recipe; or choose another --out"
    raise ExperimentError(
        f"expected --out to hold runs of the same configuration or nothing; got "
        f"{str(out)!r} with different {', '.join(changed)} ({hint})"
    )
