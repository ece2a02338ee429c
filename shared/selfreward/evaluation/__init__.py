"""Evaluation orchestration: prompt sets, answers (generated or read), pairwise judging, and
the coordinator's evaluate stage (`evaluate_iteration`). Metrics are in `selfreward.evaluation.metrics`,
report files in `selfreward.reports`; docs/evaluation.md describes all of it.
"""
