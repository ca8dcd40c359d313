"""Packaging: the import is light and works without torchvision; the metadata is single-sourced."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.resources
import re
import subprocess
import sys
from pathlib import Path

import lcma_ext

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def _setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    return config


def _cfg_list(value: str) -> list[str]:
    return [item.strip() for item in re.split(r"[,\n]", value) if item.strip()]


def test_import_has_no_torchvision_and_no_side_effects() -> None:
    code = (
        "import sys, torch\n"
        "before = torch.get_default_dtype(), torch.get_num_threads()\n"
        "import lcma_ext, lcma_ext.transforms, lcma_ext.normflows\n"
        "assert 'torchvision' not in sys.modules, 'torchvision imported at import time'\n"
        "assert 'zuko' not in sys.modules, 'zuko (an optional extra) imported at import time'\n"
        "assert (torch.get_default_dtype(), torch.get_num_threads()) == before\n"
        "print(lcma_ext.__version__)\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == importlib.metadata.version("lcma-ext")


def test_import_works_when_torchvision_cannot_be_imported() -> None:
    code = (
        "import sys\n"
        "sys.modules['torchvision'] = None  # makes 'import torchvision' raise ImportError\n"
        "import lcma_ext\n"
        "from lcma_ext import transforms\n"
        "print('ok')\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_installed_metadata_version_is_the_package_version() -> None:
    assert importlib.metadata.version("lcma-ext") == lcma_ext.__version__


def test_version_has_one_source_readable_without_importing_torch() -> None:
    # setup.cfg reads lcma_ext.__version__; setuptools evaluates it statically (no torch in the
    # isolated build environment) only if it is a plain string literal at module top level.
    assert _setup_cfg()["metadata"]["version"].strip() == "attr: lcma_ext.__version__"
    tree = ast.parse((ROOT / "lcma_ext" / "__init__.py").read_text(encoding="utf-8"))
    literals = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    assert literals == [lcma_ext.__version__]
    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert re.findall(r"^version: *\"?([^\"\s]+)\"?$", citation, flags=re.M) == [
        lcma_ext.__version__
    ]


def test_py_typed_is_in_the_package_and_its_package_data() -> None:
    assert importlib.resources.files("lcma_ext").joinpath("py.typed").is_file()
    assert "py.typed" in _cfg_list(_setup_cfg()["options.package_data"]["lcma_ext"])


def test_wheel_packages_exclude_tests_and_sdist_includes_them() -> None:
    config = _setup_cfg()
    assert config["options"]["packages"].strip() == "find:"
    include = _cfg_list(config["options.packages.find"]["include"])
    assert include and all(pattern in ("lcma_ext", "lcma_ext.*") for pattern in include)
    manifest = (ROOT / "MANIFEST.in").read_text(encoding="utf-8").splitlines()
    assert "graft tests" in manifest
    included = {
        word for line in manifest if line.startswith("include ") for word in line.split()[1:]
    }
    assert {"README.md", "LICENSE", "CHANGELOG.md", "CITATION.cff", "setup.cfg"} <= included
    assert config["metadata"]["license_files"].strip() == "LICENSE"


def test_zuko_is_an_optional_extra_with_a_clear_import_error() -> None:
    extras = _setup_cfg()["options.extras_require"]
    assert any(r.startswith("zuko") for r in _cfg_list(extras["zuko"]))
    assert any(r.startswith("zuko") for r in _cfg_list(extras["test"]))  # CI runs its tests
    code = (
        "import sys\n"
        "sys.modules['zuko'] = None  # makes 'import zuko' raise ImportError\n"
        "import lcma_ext, lcma_ext.transforms, lcma_ext.normflows\n"
        "try:\n"
        "    import lcma_ext.zuko\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert 'pip install "lcma-ext[zuko]"' in result.stdout
