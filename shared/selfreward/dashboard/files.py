"""Path confinement: every file the dashboard reads is inside the run's folder.

`confined(root, *parts)` joins, resolves (symlinks included) and refuses anything that does not
stay below `root` itself resolved: `..`, absolute parts, a symlink pointing out of the folder."""

from __future__ import annotations

import re
from pathlib import Path

# the names the data endpoints accept for a file of an iteration or an evaluation folder
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


class OutsideRun(Exception):
    """A requested path is not inside the run's folder (or is not a plain name)."""


def confined(root: Path, *parts: str) -> Path:
    """`root / parts...`, resolved; OutsideRun unless it lies inside `root` (resolved)."""
    base = root.resolve()
    for part in parts:
        if not part or Path(part).is_absolute() or "\x00" in part:
            raise OutsideRun(f"{part!r} is not a relative path")
    path = base.joinpath(*parts).resolve()
    if path != base and not path.is_relative_to(base):
        raise OutsideRun(f"{'/'.join(parts)} is outside the run folder")
    return path


def confined_name(root: Path, name: str) -> Path:
    """A single file name (no folder) inside `root`, confined."""
    if not FILE_NAME.match(name) or ".." in name:
        raise OutsideRun(f"{name!r} is not a file name")
    return confined(root, name)
