"""``lcma-ext run --arms`` with the latent-shaping arms (Flow-VAE, DenseFlow, Haar): tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lcma_ext.cli import main
from lcma_ext.experiments import ARMS, LATENT_ARMS, VAE_ARMS

TINY = [
    "run",
    "--quick",
    "--no-progress",
    "--limit",
    "64",
    "--epochs",
    "1",
    "--nms-epochs",
    "1",
    "--seeds",
    "1",
]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("latent")
    arms = "channel,flow-vae,denseflow,haar"
    assert main([*TINY, "--out", str(out), "--arms", arms]) == 0
    return out


def test_latent_arms_are_labelled_and_scored(latent_run: Path) -> None:
    results = json.loads((latent_run / "results.json").read_text())
    assert list(results["arms"]) == ["channel", *VAE_ARMS, "denseflow", "haar"]
    kinds = {arm: entry["bpd_kind"] for arm, entry in results["arms"].items()}
    assert kinds == {
        "channel": "exact",
        "haar": "exact",
        **{arm: "IWAE-16" for arm in (*VAE_ARMS, "denseflow")},
    }
    for arm in (*VAE_ARMS, "denseflow"):
        (run,) = results["runs"][arm]
        assert run["num_samples"] == 16 and run["bpd_iwae_se"] > 0
        assert run["test_bpd"] == run["bpd_iwae"]
        assert math.isfinite(run["bpd_elbo"]) and run["bpd_iwae"] <= run["bpd_elbo"] + 1e-9
        assert (latent_run / f"samples_{arm}_T0.7.png").stat().st_size > 0
    # flow-vae-R: dim(eps) = D / R on 8x8 digits (D = 64); more eps dims, more parameters
    params = [results["arms"][arm]["parameters"] for arm in VAE_ARMS]
    assert params == sorted(params) and params[0] > results["arms"]["channel"]["parameters"]
    # haar: same parameters as channel (the squeeze has none)
    assert results["arms"]["haar"]["parameters"] == results["arms"]["channel"]["parameters"]
    text = (latent_run / "results.md").read_text()
    assert "| arm | bpd kind |" in text and "| flow-vae-4 | IWAE-16 |" in text
    assert "| channel | exact |" in text and "never exact" in text


def test_latent_arms_are_not_default_and_errors_are_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not set(LATENT_ARMS) & set(ARMS)
    argv = [*TINY, "--out", str(tmp_path / "x"), "--model", "iresnet", "--arms", "haar"]
    assert main(argv) == 2
    assert "expected --model realnvp or glow for the haar arm" in capsys.readouterr().err
    assert main([*TINY, "--out", str(tmp_path / "y"), "--arms", "flow-vae-3"]) == 2
    err = capsys.readouterr().err.strip()  # validated once, by the configuration: one line
    assert "flow-vae-16" in err and "\n" not in err and not (tmp_path / "y").exists()
