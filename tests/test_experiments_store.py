"""The run store's files: atomic writes and one-line errors naming a corrupt file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lcma_ext.experiments.store import (
    ExperimentError,
    StateFileError,
    atomic_path,
    read_json,
    write_json,
    write_text,
)


def test_writes_are_atomic_and_leave_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    write_json(path, {"a": [1, 2.5, float("nan")]})
    assert read_json(path)["a"][:2] == [1, 2.5]
    write_text(path, "{}")
    assert read_json(path) == {} and [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json(path, {"old": True})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"new": tru')
        raise RuntimeError("killed mid-write")
    assert read_json(path) == {"old": True} and len(list(tmp_path.iterdir())) == 1


def test_corrupt_json_names_the_file_and_the_recovery(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "lcma_seed0.json"
    path.parent.mkdir()
    path.write_text('{"arm": "lcma", "test_bpd": 2.3')
    with pytest.raises(StateFileError) as info:
        read_json(path)
    message = str(info.value)
    assert str(path) in message and "corrupt or truncated (JSONDecodeError" in message
    assert "delete it and rerun the same command" in message and "\n" not in message
    assert isinstance(info.value, ExperimentError) and isinstance(info.value, ValueError)


def test_checksums_see_one_flipped_bit_and_survive_a_save_and_load(tmp_path: Path) -> None:
    import torch

    from lcma_ext.storage import CorruptFileError, atomic_save, content_checksum, load_stamped
    from lcma_ext.storage import stamped as stamp_state

    state = {"w": torch.randn(5, 3).t(), "b": torch.zeros(2, dtype=torch.bfloat16), "n": [1, 2.5]}
    other = {**state, "w": state["w"].clone()}
    assert content_checksum(state) == content_checksum(other)
    other["w"].view(torch.int32)[1, 2] ^= 1  # one bit of one float (a transposed tensor)
    assert content_checksum(state) != content_checksum(other)
    assert content_checksum({"a": 1}) != content_checksum({"a": 1.0})
    path = tmp_path / "state.pt"
    atomic_save(stamp_state(state, {"run": "x"}), path)
    loaded, stamp = load_stamped(path, "a state")
    assert stamp is not None and stamp["run"] == "x" and "stamp" not in loaded
    assert content_checksum(loaded) == stamp["checksum"]
    raw = torch.load(path)
    raw["n"] = [1, 2.6]
    torch.save(raw, path)
    with pytest.raises(CorruptFileError, match="does not match its checksum"):
        load_stamped(path, "a state")


def test_a_full_disk_in_torchs_writer_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import torch

    from lcma_ext import storage
    from lcma_ext.storage import DiskFullError, atomic_save

    def full(obj: object, path: object) -> None:
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"could not write .*a\.pt.*file write failed"):  # disk ok
        atomic_save({}, tmp_path / "a.pt")
    monkeypatch.setattr(storage, "_NEARLY_FULL", 2**62)  # as if the disk were full
    with pytest.raises(DiskFullError):
        atomic_save({}, tmp_path / "a.pt")

    def no_space(obj: object, path: object) -> None:
        raise RuntimeError("write failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(DiskFullError) as info:
        atomic_save({}, tmp_path / "a.pt")
    assert str(info.value).startswith(
        f"no space left on the device while writing {str(tmp_path / 'a.pt')!r}"
    )
    assert not list(tmp_path.iterdir())
