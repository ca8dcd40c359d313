"""pytest set-up of the package's docstring examples (the suite's fixtures: tests/conftest.py).

``python -m pytest`` runs them (pyproject.toml: ``--doctest-modules`` over ``testpaths``).

- Each example of ``lcma_ext`` starts from float32 and seed 0 in a forked random state, so the
  examples are reproducible and leave the tests' random state and dtype alone.
- A package module that needs an optional package that is not installed
  (:data:`OPTIONAL_PACKAGES`) is skipped, the missing package named in the reason; any other
  import error still fails the collection.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

#: Packages that some modules of the package import and a plain install lacks.
OPTIONAL_PACKAGES = ("torchvision", "zuko")
ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "lcma_ext"


def _module_name(path: Path) -> str:
    """``a/b/c.py`` -> ``a.b.c`` for the packages above ``path`` (``__init__.py`` -> package)."""
    parts = [] if path.name == "__init__.py" else [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts)


def _missing_optional_package(path: Path) -> str | None:
    """The optional package whose absence stops ``path`` from importing, if that is the cause."""
    try:
        importlib.import_module(_module_name(path))
    except ModuleNotFoundError as error:
        package = (error.name or "").partition(".")[0]
        if package in OPTIONAL_PACKAGES:
            return package
    except Exception:  # any other failure is reported by the doctest collector itself
        return None
    return None


class _Skipped(pytest.Item):
    """A placeholder test, marked skipped, reported at its module."""

    def runtest(self) -> None:
        raise AssertionError("a skipped placeholder ran")

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, self.name


class _NeedsOptionalPackage(pytest.File):
    """Stands in for the doctests of a module that cannot be imported here: one skipped test."""

    reason = ""

    def collect(self) -> Iterator[pytest.Item]:
        item = _Skipped.from_parent(self, name=_module_name(self.path))
        item.add_marker(pytest.mark.skip(reason=self.reason))
        yield item


@pytest.hookimpl(hookwrapper=True)
def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Iterator[None]:
    outcome = yield
    collectors = outcome.get_result()
    in_a_package = (file_path.parent / "__init__.py").is_file()
    if file_path.suffix != ".py" or not collectors or not in_a_package:
        return
    package = _missing_optional_package(file_path)
    if package is not None:
        node = _NeedsOptionalPackage.from_parent(parent, path=file_path)
        node.reason = f"doctests of {_module_name(file_path)} need {package}, not installed"
        outcome.force_result([node])


@pytest.fixture(autouse=True)
def _fresh_torch_state_for_examples(request: pytest.FixtureRequest) -> Iterator[None]:
    """Docstring examples of the package: float32, seed 0, random state forked."""
    if PACKAGE not in Path(str(request.node.path)).resolve().parents:
        yield
        return
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            yield
    finally:
        torch.set_default_dtype(dtype)
