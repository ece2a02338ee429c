"""The shape of a run: which stages, in which order, and what is left to run.

Model lineage: M0 is the base model, M1 = SFT(M0) on the seed data, M(t+1) = DPO(M(t)).
Iteration 0 is the set-up: prepare (base model + seed data), sft (M1), publish (serve M1).
Iteration t >= 1 uses M(t) and produces M(t+1):
prompts -> candidates -> judgments -> pairs -> train -> publish -> evaluate.

`pending(layout, t)` is the one answer to "what is left": the stages of iteration t without a
manifest, in order. Both drivers iterate it (the embedded one in this process, the RQ one as a
chain of jobs); a new stage is one module plus its line in `SETUP` or `ITERATION`.
"""

from __future__ import annotations

from selfreward.stages import (
    candidates,
    evaluate,
    judgments,
    pairs,
    prepare,
    prompts,
    publish,
    sft,
    train,
)
from selfreward.stages.stage import Stage, model_name
from selfreward.storage import RunLayout

SETUP: tuple[Stage, ...] = (prepare.STAGE, sft.STAGE, publish.STAGE)
ITERATION: tuple[Stage, ...] = (
    prompts.STAGE,
    candidates.STAGE,
    judgments.STAGE,
    pairs.STAGE,
    train.STAGE,
    publish.STAGE,
    evaluate.STAGE,
)
BY_NAME: dict[str, Stage] = {s.name: s for s in (*SETUP, *ITERATION)}


def stages_of(t: int) -> tuple[Stage, ...]:
    return SETUP if t == 0 else ITERATION


def stage_named(name: str, t: int | None = None) -> Stage:
    """The stage called `name` (of iteration t, when given); unknown names list the known ones."""
    from selfreward.errors import StageError

    known = stages_of(t) if t is not None else tuple(BY_NAME.values())
    for s in known:
        if s.name == name:
            return s
    where = f"iteration {t}" if t is not None else "a run"
    raise StageError(name, f"not a stage of {where} (stages: {', '.join(s.name for s in known)})")


def is_done(layout: RunLayout, t: int, stage: Stage | str) -> bool:
    name = stage if isinstance(stage, str) else stage.name
    return layout.stage_manifest(t, name).is_file()


def pending(layout: RunLayout, t: int) -> list[Stage]:
    """The stages of iteration t still to run, in order."""
    return [s for s in stages_of(t) if not is_done(layout, t, s)]


def iteration_done(layout: RunLayout, t: int) -> bool:
    return not pending(layout, t)


def completed_iterations(layout: RunLayout) -> int:
    """The highest t whose iterations 0..t are all done, or -1."""
    t = -1
    while iteration_done(layout, t + 1):
        t += 1
    return t


def served_name(layout: RunLayout, t: int) -> str:
    """The name the policy serves M(t) under (from the stage that made it current)."""
    if t == 0:
        result = prepare.STAGE.read_result(layout, 0)
        name = getattr(result, "base_served_name", None)
    else:
        result = publish.STAGE.read_result(layout, t - 1)
        name = getattr(result, "served_name", None)
    if name is None:
        raise LookupError(f"M{t} is not published yet in run {layout.run!r}")
    return str(name)


__all__ = [
    "ITERATION",
    "SETUP",
    "completed_iterations",
    "is_done",
    "iteration_done",
    "model_name",
    "pending",
    "served_name",
    "stage_named",
    "stages_of",
]
