"""Check the contents of the sdist and the wheel in dist/ (run by .ci/wheel_check).

The wheel holds the lcma_ext package only (no tests, docs, run folders or checkpoints) and its
py.typed marker; the sdist holds what building and testing need.
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

SDIST_REQUIRED = (
    "README.md",
    "LICENSE",
    "CHANGELOG.md",
    "CITATION.cff",
    "pyproject.toml",
    "setup.cfg",
    "MANIFEST.in",
    "lcma_ext/__init__.py",
    "lcma_ext/py.typed",
    "tests/test_packaging.py",
    "tests/brute_force.py",
)


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} in {dist}, found {[p.name for p in found]}")
    return found[0]


def check_wheel(path: Path) -> list[str]:
    names = zipfile.ZipFile(path).namelist()
    top = sorted({name.split("/")[0] for name in names})
    problems = [
        f"unexpected top-level entry {t!r}"
        for t in top
        if t != "lcma_ext" and not (t.startswith("lcma_ext-") and t.endswith(".dist-info"))
    ]
    problems += [f"checkpoint {n!r}" for n in names if n.endswith((".pt", ".pth", ".ckpt"))]
    problems += [f"image {n!r}" for n in names if n.endswith((".png", ".jpg", ".svg"))]
    problems += [f"test file {n!r}" for n in names if "/tests/" in n or n.startswith("tests/")]
    for required in ("lcma_ext/__init__.py", "lcma_ext/py.typed"):
        if required not in names:
            problems.append(f"missing {required}")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        problems.append("missing the LICENSE in .dist-info/licenses/")
    print(f"{path.name}: {len(names)} files; top level {', '.join(top)}")
    return problems


def check_sdist(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        names = tar.getnames()
    root = names[0].split("/")[0]
    relative = {name[len(root) + 1 :] for name in names if name.startswith(root + "/")}
    problems = [f"missing {r}" for r in SDIST_REQUIRED if r not in relative]
    problems += [f"bytecode {n!r}" for n in relative if "__pycache__" in n or n.endswith(".pyc")]
    problems += [f"run folder {n!r}" for n in relative if n.startswith(("runs/", "out/"))]
    tests = sorted(n for n in relative if n.startswith("tests/") and n.endswith(".py"))
    print(f"{path.name}: {len(names)} entries; {len(tests)} test modules")
    return problems


def main(dist: Path) -> None:
    problems = check_wheel(_one(dist, "*.whl")) + check_sdist(_one(dist, "*.tar.gz"))
    if problems:
        raise SystemExit("distribution contents:\n  " + "\n  ".join(problems))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "dist"))
