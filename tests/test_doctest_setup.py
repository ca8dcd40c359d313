"""The docstring examples run with the README test command, and optional packages skip cleanly.

``python -m pytest`` collects the package with ``--doctest-modules`` (pyproject.toml); the
repository's conftest.py turns a module that needs a missing optional package (torchvision,
zuko) into one skip, while any other import error still fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_command_collects_the_package_examples(pytestconfig: pytest.Config) -> None:
    assert "lcma_ext" in pytestconfig.getini("testpaths")
    assert "--doctest-modules" in pytestconfig.getini("addopts")
    examples = [path for path in (ROOT / "lcma_ext").rglob("*.py") if ">>>" in path.read_text()]
    assert len(examples) >= 5  # sampling, storage, models, denseflow, config, data, ...


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_module_needing_a_missing_optional_package_is_skipped(tmp_path: Path) -> None:
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    _write(tmp_path / "pytest.ini", "[pytest]\naddopts = --doctest-modules -rA\n")
    _write(tmp_path / "pkg" / "__init__.py", "")
    _write(tmp_path / "pkg" / "plain.py", '"""Example:\n\n>>> 1 + 1\n2\n"""\n')
    # what ``import zuko`` raises where zuko is not installed, whether or not it is here
    _write(
        tmp_path / "pkg" / "needs_zuko.py",
        '"""Example:\n\n>>> 1 + 1\n3\n"""\n\n'
        "raise ModuleNotFoundError(\"No module named 'zuko'\", name='zuko')\n",
    )
    # any other import error is not hidden
    _write(tmp_path / "pkg" / "broken.py", "import a_module_that_does_not_exist\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--continue-on-collection-errors",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr  # the collection error fails the run
    assert "SKIPPED [1] pkg/needs_zuko.py: doctests of pkg.needs_zuko need zuko, not installed" in (
        done.stdout
    )
    assert "ERROR pkg/broken.py" in done.stdout and "a_module_that_does_not_exist" in done.stdout
    assert "PASSED pkg/plain.py::pkg.plain" in done.stdout
