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
