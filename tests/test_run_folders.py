"""Run folders that know what they were made from (issue 24): each case as a user meets it.

Every refusal is one line that names the file and what differs; where it gives advice, the test
follows it and checks the run then completes (with the figures of an untouched run).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lcma_ext.cli import main
from lcma_ext.data import load_dataset

TINY = ["--quick", "--limit", "64", "--epochs", "1", "--nms-epochs", "1", "--seeds", "1"]


def _run(out: Path, *extra: str, arms: str = "lcma,channel") -> list[str]:
    return ["run", *TINY, "--arms", arms, "--no-progress", "--out", str(out), *extra]


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one stderr line of a command that must fail with exit status 2."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    return errors[0]


def _ok(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().err


def _bpd(out: Path, name: str) -> float:
    return json.loads((out / "runs" / f"{name}.json").read_text())["test_bpd"]


def _digits_npz(path: Path, flip: bool = False) -> Path:
    data = load_dataset("digits")
    train, test = data.train.numpy(), data.test.numpy()
    if flip:  # other content, same count, shape and levels
        train, test = train[..., ::-1].copy(), test[..., ::-1].copy()
    np.savez(path, train=train, test=test, levels=np.array(data.levels))
    return path


# ----------------------------------------------------------------------------------------------
# 1. other data under the same name


def test_replaced_npz_content_is_refused_and_the_advice_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    npz = _digits_npz(tmp_path / "mine.npz")
    out = tmp_path / "run"
    _ok(capsys, _run(out, "--dataset", "npz:mine.npz"))  # a relative path, as users type it
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["data"]["source"] == str(npz.resolve())  # recorded absolute
    assert provenance["data"]["channels"] == 1 and provenance["launcher"] == "plain"
    before = _bpd(out, "lcma_seed0")
    _digits_npz(npz, flip=True)
    line = _error(capsys, _run(out, "--dataset", "npz:mine.npz", arms="lcma,channel,random"))
    assert "provenance.json" in line and "other training images" in line
    assert "restore that data, or choose another --out" in line
    # evaluate, sample's data and interpolate on other data: refused too
    line = _error(capsys, ["evaluate", str(out)])
    assert "other training images" in line and str(npz.resolve()) in line
    line = _error(capsys, ["interpolate", str(out), "--arm", "lcma", "--seed", "0"])
    assert "other training images" in line
    # the advice: another --out completes on the new data ...
    _ok(capsys, _run(tmp_path / "other", "--dataset", "npz:mine.npz", arms="lcma,channel,random"))
    # ... and restoring the data resumes the old folder with its old figures
    _digits_npz(npz)
    _ok(capsys, _run(out, "--dataset", "npz:mine.npz", arms="lcma,channel,random"))
    assert _bpd(out, "lcma_seed0") == before and (out / "runs" / "random_seed0.json").is_file()
    # the recorded absolute path is read from anywhere (not a same-named file elsewhere)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _digits_npz(elsewhere / "mine.npz", flip=True)
    monkeypatch.chdir(elsewhere)
    _ok(capsys, ["evaluate", str(out)])


def _images(folder: Path, count: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    for index in range(count):
        pixels = generator.integers(0, 256, size=(8, 8), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:03d}.png")


def test_half_an_image_folder_replaced_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "images"
    _images(root / "train", 40, seed=0)
    _images(root / "test", 40, seed=1)
    out = tmp_path / "run"
    argv = _run(out, "--dataset", "imagefolder", "--data-root", str(root))
    _ok(capsys, argv)
    assert json.loads((out / "provenance.json").read_text())["data"]["source"] == str(root)
    _ok(capsys, ["evaluate", str(out)])  # the recorded root: no --data-root needed
    for path in sorted((root / "train").iterdir())[:20]:  # half the images, same count and size
        path.unlink()
    _images(root / "train", 20, seed=2)
    line = _error(capsys, argv)
    assert "other training images" in line and "provenance.json" in line
    assert "other training images" in _error(capsys, ["evaluate", str(out)])


# ----------------------------------------------------------------------------------------------
# 2. files of another run copied in; 3. bit-rot


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("two")
    assert main(_run(root / "a")) == 0
    assert main(_run(root / "b", "--lr", "0.002")) == 0
    return root / "a", root / "b"


def _copy(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    return out


@pytest.mark.parametrize("name", ["checkpoints/channel_seed0.pt", "contributions.pt"])
def test_a_file_of_another_run_is_refused_and_the_advice_works(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    a, b = two_runs
    out = _copy(a, tmp_path)
    (out / "runs" / "channel_seed0.json").unlink()
    (out / "runs" / "lcma_seed0.json").unlink()
    shutil.copy(b / name, out / name)
    line = _error(capsys, _run(out))
    assert repr(str(out / name)) in line and "another configuration" in line
    assert "delete it and rerun the same command" in line
    (out / name).unlink()
    _ok(capsys, _run(out))
    for run in ("lcma_seed0", "channel_seed0"):
        assert _bpd(out, run) == _bpd(a, run)


def _flip_a_weight_bit(path: Path) -> None:
    """Flip one bit inside a parameter's bytes (the file still loads)."""
    state = torch.load(path, weights_only=False)
    tensor = next(t for t in state["model"].values() if t.numel() >= 8 and t.abs().sum() > 0)
    raw = tensor.contiguous().numpy().tobytes()
    data = bytearray(path.read_bytes())
    where = data.find(raw[:32])
    assert where >= 0
    data[where + 5] ^= 0x10
    path.write_bytes(bytes(data))


def test_bit_rot_in_a_checkpoint_is_caught(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = two_runs
    out = _copy(a, tmp_path)
    path = out / "checkpoints" / "lcma_seed0.pt"
    _flip_a_weight_bit(path)
    torch.load(path, weights_only=False)  # torch itself does not notice
    line = _error(capsys, ["sample", str(out), "--arm", "lcma", "--seed", "0"])
    assert repr(str(path)) in line and "does not match its checksum" in line
    (out / "runs" / "lcma_seed0.json").unlink()  # a resume would train on the rotten weights
    line = _error(capsys, _run(out))
    assert repr(str(path)) in line and "delete it and rerun the same command" in line
    path.unlink()
    _ok(capsys, _run(out))
    assert _bpd(out, "lcma_seed0") == _bpd(a, "lcma_seed0")


# ----------------------------------------------------------------------------------------------
# 4. another launcher


def test_a_plain_folder_is_not_resumed_under_torchrun_and_back(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = tmp_path / "run"
    plain = [sys.executable, "-m", "lcma_ext", "run", *_run(out)[1:]]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", "1", "-m", "lcma_ext", "run", *_run(out)[1:]]
    subprocess.run(plain, check=True, cwd=tmp_path, env=env, timeout=600)
    before = _bpd(out, "lcma_seed0")
    (out / "runs" / "lcma_seed0.json").unlink()  # as if killed before its summary
    done = subprocess.run(
        torchrun, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    errors = [line for line in done.stderr.splitlines() if "lcma-ext run: error:" in line]
    assert done.returncode != 0 and len(errors) == 1, done.stderr
    assert "as a plain process" in errors[0] and "rerun it without torchrun" in errors[0]
    assert "got torchrun with world size 1" in errors[0]
    subprocess.run(plain, check=True, cwd=tmp_path, env=env, timeout=600)
    assert _bpd(out, "lcma_seed0") == before


def test_a_torchrun_folder_is_not_resumed_by_a_plain_process(tmp_path: Path) -> None:
    from lcma_ext.experiments.store import Provenance, RunIdentity, RunMismatchError, RunStore

    identity = RunIdentity("c", "tr", "te", "torchrun", 2)
    store = RunStore(tmp_path / "run")
    store.create({"a": 1}, Provenance(identity, "digits", 1), writes=True)
    plain = Provenance(RunIdentity("c", "tr", "te", "plain", 1), "digits", 1)
    with pytest.raises(RunMismatchError, match="under torchrun with 2 processes in all"):
        RunStore(tmp_path / "run").create({"a": 1}, plain, writes=True)


# ----------------------------------------------------------------------------------------------
# 5. --out ''; 6. evaluate and a missing checkpoint


def test_an_empty_out_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lcma_ext.experiments import ExperimentConfig

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:  # argparse: usage and one error line
        main([*_run(Path("x"))[:-1], ""])
    assert info.value.code == 2
    assert "argument --out: expected a folder name; got ''" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected out to name a run folder; got ''"):
        ExperimentConfig(out="")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_names_an_arm_whose_checkpoint_is_missing(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = two_runs
    out = _copy(a, tmp_path)
    (out / "checkpoints" / "channel_seed0.pt").unlink()
    err = _ok(capsys, ["evaluate", str(out)])
    assert "channel seed 0 is left out" in err and "channel_seed0.pt' is missing" in err
    rows = json.loads((out / "evaluation.json").read_text())["rows"]
    missing = [row for row in rows if row["bpd_kind"] == "no checkpoint"]
    assert [(row["arm"], row["seed"]) for row in missing] == [("channel", 0)]
    assert "| channel | 0 | no checkpoint |" in (out / "evaluation.md").read_text()


# ----------------------------------------------------------------------------------------------
# 7. the lcma-self switch file


def test_the_advice_after_an_empty_switch_file_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "self"
    argv = _run(out, "--epochs", "2", "--reestimate-every", "1", arms="lcma-self")
    _ok(capsys, argv)
    before = _bpd(out, "lcma-self_seed0")
    (out / "runs" / "lcma-self_seed0.json").unlink()
    (out / "checkpoints" / "lcma-self_seed0.pt").unlink()
    switch = out / "checkpoints" / "phases" / "lcma-self_seed0_phase1_switch.pt"
    switch.write_bytes(b"")
    line = _error(capsys, argv)
    assert repr(str(switch)) in line and "delete it and rerun the same command" in line
    switch.unlink()
    _ok(capsys, argv)
    assert _bpd(out, "lcma-self_seed0") == before


# ----------------------------------------------------------------------------------------------
# 16. tiny data and large models


def test_tiny_data_and_a_large_model_draw_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "big"
    argv = ["run", "--limit", "8", "--epochs", "1", "--nms-epochs", "1", "--seeds", "1"]
    err = _ok(capsys, [*argv, "--size", "small", "--arms", "channel", "--out", str(out)])
    assert "digits: 8 training images, fewer than one batch (64)" in err
    assert "digits: 8 test images, fewer than 32" in err
    assert "realnvp (small) has 0.7 M parameters for 8 training images of 64 values" in err
    assert "a smaller --size suits this data" in err
    quiet = _ok(capsys, _run(tmp_path / "quiet"))  # 64 images, tiny: a size that fits
    assert "parameters for" not in quiet


# ----------------------------------------------------------------------------------------------
# the raw tracebacks


def test_a_garbled_contributions_file_of_an_earlier_version_is_one_line(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = two_runs
    out = _copy(a, tmp_path)
    (out / "provenance.json").unlink()  # a folder of an earlier version: files unverified
    for path in (out / "runs").glob("*_seed*.json"):
        path.unlink()
    state = torch.load(out / "contributions.pt", weights_only=True)
    del state["stamp"]
    state["level_positions"] = [p.flip(0)[: len(p) // 2] for p in state["level_positions"]]
    torch.save(state, out / "contributions.pt")
    line = _error(capsys, _run(out))
    assert "contributions.pt" in line and "delete it and rerun the same command" in line


def test_a_glow_nms_in_a_realnvp_folder_is_one_line(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = two_runs
    glow = tmp_path / "glow"
    _ok(capsys, _run(glow, "--model", "glow", arms="channel"))
    out = _copy(a, tmp_path)
    shutil.copy(glow / "checkpoints" / "nms.pt", out / "checkpoints" / "nms.pt")
    line = _error(capsys, ["evaluate", str(out)])
    assert "nms.pt" in line and "another configuration" in line
    (out / "provenance.json").unlink()  # an earlier version's folder: no fingerprints to compare
    state = torch.load(out / "checkpoints" / "nms.pt", weights_only=False)
    del state["stamp"]
    torch.save(state, out / "checkpoints" / "nms.pt")
    line = _error(capsys, ["evaluate", str(out)])
    assert "nms.pt' holds the weights of another model" in line


def test_a_full_disk_names_the_file_and_the_rerun_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "full"
    save = torch.save

    def full(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if "lcma_seed0" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    line = _error(capsys, _run(out))
    assert "no space left on the device while writing" in line and "lcma_seed0.pt" in line
    assert "free some space and rerun the same command" in line
    assert not list(out.rglob("*.tmp*"))
    monkeypatch.setattr(torch, "save", save)
    _ok(capsys, _run(out))
    assert (out / "results.json").is_file()


def test_a_killed_ddp_rank_leaves_one_line_per_surviving_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    worker = Path(__file__).parent / "workers" / "ddp_kill.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--monitor-interval", "2", "--nproc_per_node", "2"]
    command += [str(worker), *_run(tmp_path / "run")]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0
    survivor = [line for line in done.stderr.splitlines() if "lcma-ext run: error:" in line]
    assert len(survivor) == 1, done.stderr
    assert "rank 0: another process of this torchrun job stopped" in survivor[0]
    assert "rerun the same torchrun command to resume" in survivor[0]
    assert "[rank0]: Traceback" not in done.stderr and "rank 0 exit status 1" in done.stderr


# ----------------------------------------------------------------------------------------------
# folders of earlier versions


def _as_earlier_version(out: Path) -> None:
    """Remove what fingerprints added: provenance.json and every file's stamp."""
    (out / "provenance.json").unlink()
    for path in out.rglob("*.pt"):
        state = torch.load(path, weights_only=False)
        state.pop("stamp", None)
        torch.save(state, path)
    for path in (out / "runs").glob("*.json"):
        summary = json.loads(path.read_text())
        summary.pop("stamp", None)
        path.write_text(json.dumps(summary))


def test_a_folder_of_an_earlier_version_resumes_with_one_warning(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = two_runs
    out = _copy(a, tmp_path)
    _as_earlier_version(out)
    (out / "runs" / "lcma_seed0.json").unlink()
    err = _ok(capsys, _run(out))
    warnings = [line for line in err.splitlines() if "earlier version" in line]
    assert len(warnings) == 1 and "used unverified" in warnings[0]
    assert _bpd(out, "lcma_seed0") == _bpd(a, "lcma_seed0")
    assert json.loads((out / "provenance.json").read_text())["unverified_files"] is True
    assert "stamp" in json.loads((out / "runs" / "lcma_seed0.json").read_text())
    _ok(capsys, _run(out))  # and again: the unstamped files stay accepted


def test_an_earlier_versions_folder_is_read_with_one_warning(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = two_runs
    out = _copy(a, tmp_path)
    _as_earlier_version(out)
    err = _ok(capsys, ["evaluate", str(out)])
    assert len([line for line in err.splitlines() if "earlier version" in line]) == 1
    rows = json.loads((out / "evaluation.json").read_text())["rows"]
    recorded = {row["arm"]: row["recorded_bpd"] for row in rows}
    assert recorded["lcma"] == _bpd(a, "lcma_seed0")
    assert json.loads((out / "results.json").read_text())["arms"]["lcma"]["bpd_per_seed"]
