"""Alias of the 0.1 job path `selfreward.services.coordinator.jobs.run_stage_job`.

RQ stores a job's function as a dotted path: stage jobs enqueued by a 0.1 coordinator name this
module. It forwards to `selfreward.drivers.rq`, so those jobs still run after an upgrade (and
their failure callbacks still fire). Removed in 0.3.
"""

from selfreward.drivers.rq import on_stage_failure, run_stage_job

__all__ = ["on_stage_failure", "run_stage_job"]
