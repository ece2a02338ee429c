"""`selfreward methods`: the feedback methods a run config's `variant` may name."""

from __future__ import annotations

from selfreward.cli.ui import print_table


def methods() -> None:
    """List the feedback methods: name (the config's `variant`), what it does, its paper."""
    from selfreward.methods import METHODS

    rows = [(m.name, m.summary, m.paper) for m in METHODS.values()]
    print_table("feedback methods (variant:)", ["name", "what it does", "paper"], rows)
