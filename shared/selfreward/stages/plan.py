"""The shape of a run: which stages, in which order, and what is left to run.

Model lineage: M0 is the base model, M1 = SFT(M0) on the seed data, M(t+1) = DPO(M(t)).
Iteration 0 is the set-up: prepare (base model + seed data), sft (M1), publish (serve M1).
Iteration t >= 1 uses M(t) and produces M(t+1):
prompts -> candidates -> judgments -> pairs -> train -> publish -> evaluate.

The run's method (selfreward.methods) names the stages of its iterations (meta-reward adds
`meta_judgments`); `pending(layout, t, method)` is the one answer to "what is left": the stages
of iteration t without a manifest, in order. Both drivers iterate it (the embedded one in this
process, the RQ one as a chain of jobs); a new stage is one module plus its line in `STAGES`.
"""

from __future__ import annotations

from selfreward.stages import (
    candidates,
    evaluate,
    judgments,
    meta_judgments,
    pairs,
    prepare,
    prompts,
    publish,
    reference_judgments,
    sft,
    temporal,
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
# every stage a method may name, by name
BY_NAME: dict[str, Stage] = {
    s.name: s for s in (*SETUP, *ITERATION, meta_judgments.STAGE, reference_judgments.STAGE, *temporal.STAGES)
}


def stages_of(t: int, method: str | None = None) -> tuple[Stage, ...]:
    """The stages of iteration t of a run of `method` (default: self-reward's)."""
    if t == 0:
        return SETUP
    if method is None:
        return ITERATION
    from selfreward.methods import method_named

    return tuple(BY_NAME[name] for name in method_named(method).stages)


def stage_named(name: str, t: int | None = None, method: str | None = None) -> Stage:
    """The stage called `name` (of iteration t, when given); unknown names list the known ones."""
    from selfreward.errors import StageError

    known = stages_of(t, method) if t is not None else tuple(BY_NAME.values())
    for s in known:
        if s.name == name:
            return s
    where = f"iteration {t}" if t is not None else "a run"
    raise StageError(name, f"not a stage of {where} (stages: {', '.join(s.name for s in known)})")


def is_done(layout: RunLayout, t: int, stage: Stage | str) -> bool:
    name = stage if isinstance(stage, str) else stage.name
    return layout.stage_manifest(t, name).is_file()


def pending(layout: RunLayout, t: int, method: str | None = None) -> list[Stage]:
    """The stages of iteration t still to run, in order."""
    return [s for s in stages_of(t, method) if not is_done(layout, t, s)]


def iteration_done(layout: RunLayout, t: int, method: str | None = None) -> bool:
    return not pending(layout, t, method)


def completed_iterations(layout: RunLayout, method: str | None = None) -> int:
    """The highest t whose iterations 0..t are all done, or -1."""
    t = -1
    while iteration_done(layout, t + 1, method):
        t += 1
    return t


def served_name(layout: RunLayout, t: int) -> str:
    """The name the policy serves M(t) under (from the stage that made it current)."""
    from selfreward.errors import InputError

    try:
        if t == 0:
            name = getattr(prepare.STAGE.read_result(layout, 0), "base_served_name", None)
        else:
            name = getattr(publish.STAGE.read_result(layout, t - 1), "served_name", None)
    except InputError as exc:
        raise LookupError(f"M{t} of run {layout.run!r}: {exc}") from None
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
