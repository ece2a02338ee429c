"""`teacher-demo`: the teacher writes the preferred answer, M(t)'s own is rejected.

The candidates stage asks the student for one sample and the teacher for its answer; no judge
runs (the judgment stage records that it was skipped); chosen = the teacher's answer,
rejected = the student's (`selfreward.stages.pairs.demonstration_pairs`).
"""

from __future__ import annotations

from selfreward.methods.method import Method
from selfreward.methods.teacher_reward import needs_teacher
from selfreward.stages.pairs import demonstration_pairs_of

METHOD = Method(
    name="teacher-demo",
    summary="the teacher writes the chosen answer, M(t)'s own answer is rejected; no judge",
    paper="distillation as preference pairs (DPO on teacher demonstrations, cf. SPIN, Chen et al. 2024)",
    build_pairs=demonstration_pairs_of,
    feedback_judge=lambda config: None,
    samples=lambda config: 1,
    teacher_answers=True,
    rules=needs_teacher,
    config_fields=("teacher",),
)
