"""Print the requirements of the project's core plus the given extras, from pyproject.toml.

    python requirements/extras.py judge            -> core + judge
    python requirements/extras.py train --no-torch -> core + worker + train, without torch

The images install these before the sources are copied (a source change does not reinstall the
dependencies). Self-references such as "selfreward[worker]" are expanded.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(extras: list[str], *, torch: bool = True) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()

    def add(items: list[str]) -> None:
        for req in items:
            own = re.fullmatch(rf"{name}\[([^\]]+)\]", req)
            if own:
                for extra in own.group(1).split(","):
                    expand(extra.strip())
            elif req not in out and (torch or not re.match(r"torch\b", req)):
                out.append(req)

    def expand(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; extras: {', '.join(optional)}")
        seen.add(extra)
        add(optional[extra])

    add(project["dependencies"])
    for extra in extras:
        expand(extra)
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    print("\n".join(requirements(args, torch="--no-torch" not in sys.argv)))
