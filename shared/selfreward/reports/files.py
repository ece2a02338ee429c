"""Write one evaluation's files: report.json, report.md and its PNG plots, each atomically.

report.json is written last: its presence means the whole report is there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from selfreward.storage import atomic_write_bytes, atomic_write_json, atomic_write_text


def write_report(
    out_dir: str | Path, data: Mapping[str, Any], markdown: str, plots: Mapping[str, bytes]
) -> dict[str, Path]:
    """Write `<out_dir>/{<plot>.png, report.md, report.json}`; returns the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, png in plots.items():
        paths[name] = atomic_write_bytes(out / name, png)
    paths["markdown"] = atomic_write_text(out / "report.md", markdown)
    paths["json"] = atomic_write_json(out / "report.json", {**data, "plots": sorted(plots)})
    return paths
