"""The run's evaluator: one judge for every evaluation of a run, never the model under test.

A trend across iterations means something only if every iteration is measured with the same
ruler, and a model judging its own answers against its parent's is biased toward itself
(self-preference). So the evaluation judge is chosen from the run's config and pinned by the
run's first evaluation in `runs/<run>/eval/evaluator.json`, with what identifies its weights:

1. `eval.judge` when set (`kind: configured`); `policy:m<k>` names the run's model M<k> (M0 the
   base, M1 the SFT model, ...), resolved to its served name; naming the model under test this
   way is an error. `policy:self` (the model under test itself) is allowed only so, explicitly,
   and then `self_evaluation` is true and every report says "self-evaluation: biased toward the
   evaluated model" (it is then also not fixed across iterations);
2. else the teacher (`teacher.backend`, `kind: teacher`): a remote model, identified by its spec;
3. else M0, the base model the run does not train (`kind: base`, weights = the prepared base
   model folder's sha256).

Later evaluations read the pinned evaluator; a config whose evaluator differs from it is refused
(remove `eval/evaluator.json` to re-pin, knowing that the trend then mixes rulers).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from selfreward.config import RunConfig
from selfreward.errors import ConfigError, StageError
from selfreward.storage import RunLayout, atomic_write_json, read_manifest

SELF_NOTE = "self-evaluation: biased toward the evaluated model"
RUN_MODEL = re.compile(r"^policy:m(\d+)$")

Kind = Literal["configured", "teacher", "base", "self"]


class Evaluator(BaseModel):
    spec: str  # as configured: policy:m0, gemini:..., openai:..., policy:self
    kind: Kind
    judge: str | None = None  # the resolved judge spec (policy:<served name>); None for policy:self
    model: str | None = None  # m<k> when the evaluator is a model of the run
    weights_sha256: str | None = None  # base model folder or adapter sha256; None for remote judges
    self_evaluation: bool = False
    pinned_at_iteration: int | None = None

    @property
    def note(self) -> str | None:
        return SELF_NOTE if self.self_evaluation else None


def evaluator_spec(config: RunConfig) -> tuple[str, Kind]:
    """What the config asks for (see the module docstring)."""
    if config.eval.judge:
        return config.eval.judge, "self" if config.eval.judge == "policy:self" else "configured"
    if config.teacher.backend:
        return config.teacher.backend, "teacher"
    return "policy:m0", "base"


def _weights(layout: RunLayout, k: int, base_dir: str | None) -> str | None:
    if k == 0:
        if base_dir is None:
            return None
        from selfreward.training.request import base_model_sha256

        return base_model_sha256(Path(base_dir))
    manifest = read_manifest(layout.models_dir / f"m{k}" / "manifest.json") or {}
    return manifest.get("adapter_sha256")


async def resolve_evaluator(
    config: RunConfig,
    layout: RunLayout,
    t: int,
    served: Callable[[int], Awaitable[str]],
    base_dir: str | None,
) -> Evaluator:
    """The evaluator of iteration t's evaluation (M(t+1) under test), pinned by the run's first."""
    spec, kind = evaluator_spec(config)
    under_test = t + 1
    path = layout.eval_dir / "evaluator.json"
    pinned = read_manifest(path)
    if pinned is not None and pinned.get("spec") != spec:
        raise StageError(
            "evaluate",
            f"the run's evaluator is pinned to {pinned.get('spec')!r} ({path}); the config now asks for "
            f"{spec!r}: a different judge would measure later iterations with another ruler. Remove {path} "
            "to re-pin it, knowing that the trend then mixes judges",
        )
    if kind == "self":
        evaluator = Evaluator(spec=spec, kind=kind, self_evaluation=True)
    else:
        match = RUN_MODEL.match(spec)
        if match:
            k = int(match.group(1))
            if k >= under_test:
                raise ConfigError(
                    [
                        f"eval.judge {spec!r} is M{k}, {'the model under test' if k == under_test else 'not trained yet'} "
                        f"in iteration {t}: an evaluator must be a model the run does not evaluate (policy:m0 "
                        "for the base model); policy:self asks for self-evaluation explicitly"
                    ],
                    "eval.judge",
                )
            evaluator = Evaluator(
                spec=spec,
                kind=kind,
                judge=f"policy:{await served(k)}",
                model=f"m{k}",
                weights_sha256=_weights(layout, k, base_dir),
            )
        else:
            evaluator = Evaluator(spec=spec, kind=kind, judge=spec)
    if pinned is None:
        evaluator.pinned_at_iteration = t
        atomic_write_json(path, evaluator.model_dump(mode="json"))
    else:
        evaluator.pinned_at_iteration = pinned.get("pinned_at_iteration")
        if pinned.get("weights_sha256") not in (None, evaluator.weights_sha256):
            raise StageError(
                "evaluate",
                f"the pinned evaluator {spec} had weights {pinned['weights_sha256'][:12]}, now "
                f"{str(evaluator.weights_sha256)[:12]} ({path}): the ruler changed",
            )
    return evaluator
