"""Print the README.md code block marked ``<!-- example:NAME -->`` (the marker line just before it).

Usage: python .ci/readme_block.py NAME [README.md]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def marked_block(text: str, name: str) -> str:
    pattern = rf"<!-- example:{re.escape(name)} -->\n```[A-Za-z0-9_-]*\n(.*?)```"
    matches = re.findall(pattern, text, flags=re.S)
    if len(matches) != 1:
        raise SystemExit(f"expected one block marked 'example:{name}', found {len(matches)}")
    return matches[0]


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        raise SystemExit(__doc__)
    readme = Path(argv[2]) if len(argv) == 3 else Path(__file__).resolve().parents[1] / "README.md"
    sys.stdout.write(marked_block(readme.read_text(encoding="utf-8"), argv[1]))


if __name__ == "__main__":
    main(sys.argv)
