"""Packaging: the import is light and works without torchvision."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_import_has_no_torchvision_and_no_side_effects():
    code = (
        "import sys, torch\n"
        "before = torch.get_default_dtype(), torch.get_num_threads()\n"
        "import lcma_ext, lcma_ext.transforms, lcma_ext.normflows\n"
        "assert 'torchvision' not in sys.modules, 'torchvision imported at import time'\n"
        "assert (torch.get_default_dtype(), torch.get_num_threads()) == before\n"
        "print(lcma_ext.__version__)\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.1.0"


def test_import_works_when_torchvision_cannot_be_imported():
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
