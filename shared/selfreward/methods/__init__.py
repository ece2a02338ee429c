"""Feedback methods: how an iteration builds its preference data (docs/methods.md).

One module per method, each with its `METHOD` record (`selfreward.methods.method.Method`);
`METHODS` registers them by name, the run config's `variant` selects one. A new method is one
module plus its line here (and, when it has settings, its section in `selfreward.config`).
"""

from __future__ import annotations

from selfreward.config import RunConfig
from selfreward.errors import ConfigError
from selfreward.methods import cream, meta_reward, self_reward, spin, teacher_demo, teacher_reward, temporal
from selfreward.methods.method import Method

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        self_reward.METHOD,
        teacher_reward.METHOD,
        teacher_demo.METHOD,
        meta_reward.METHOD,
        spin.METHOD,
        cream.METHOD,
        temporal.METHOD,
    )
}


def method_named(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            [f"variant: unknown method {name!r}; methods: {', '.join(METHODS)}"], "variant"
        ) from None


def method_of(config: RunConfig) -> Method:
    return method_named(config.variant)


__all__ = ["METHODS", "Method", "method_named", "method_of"]
