"""The shape of a run: which stages, in which order, on which queue, and where their manifests live.

Model lineage: M0 is the base model, M1 = SFT(M0) on the seed data, M(t+1) = DPO(M(t)).
Iteration 0 is the set-up ("stage 0" of a run): prepare (base model + seed data), sft (M1),
publish (serve M1). Iteration t >= 1 uses M(t) and produces M(t+1):
prompts -> candidates -> judgments -> pairs -> train -> publish -> evaluate.

A stage is done when its manifest `iter-<t>/<stage>.manifest.json` exists; the first stage
without one is where a run resumes.
"""

from __future__ import annotations

from selfreward.storage import RunLayout, read_manifest

SETUP_STAGES = ("prepare", "sft", "publish")
ITERATION_STAGES = ("prompts", "candidates", "judgments", "pairs", "train", "publish", "evaluate")

# RQ queue of each stage in the distributed mode (workers subscribe to the queues they serve)
QUEUE_OF = {
    "prepare": "train",
    "sft": "train",
    "prompts": "generate",
    "candidates": "generate",
    "judgments": "judge",
    "pairs": "judge",
    "train": "train",
    "publish": "generate",
    "evaluate": "evaluate",
}
QUEUES = ("generate", "judge", "train", "evaluate")


def stages_of(t: int) -> tuple[str, ...]:
    return SETUP_STAGES if t == 0 else ITERATION_STAGES


def model_name(t: int) -> str:
    """M(t)'s name in the artifact store: m0 (base), m1 (SFT), m2, ..."""
    return f"m{t}"


def is_done(layout: RunLayout, t: int, stage: str) -> bool:
    return layout.stage_manifest(t, stage).is_file()


def first_unfinished(layout: RunLayout, t: int) -> str | None:
    for stage in stages_of(t):
        if not is_done(layout, t, stage):
            return stage
    return None


def iteration_done(layout: RunLayout, t: int) -> bool:
    return first_unfinished(layout, t) is None


def completed_iterations(layout: RunLayout) -> int:
    """The highest t whose iterations 0..t are all done, or -1."""
    t = -1
    while iteration_done(layout, t + 1):
        t += 1
    return t


def served_name(layout: RunLayout, t: int) -> str:
    """The name the policy serves M(t) under (from the publish manifest that made it current)."""
    if t == 0:
        manifest = read_manifest(layout.stage_manifest(0, "prepare"))
        key = "base_served_name"
    else:
        manifest = read_manifest(layout.stage_manifest(t - 1, "publish"))
        key = "served_name"
    if manifest is None or key not in manifest:
        raise LookupError(f"M{t} is not published yet in run {layout.run!r}")
    return str(manifest[key])
