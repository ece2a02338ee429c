"""transformers `TrainerCallback`s: progress (job meta, CLI bar, progress file) and the tracker."""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import TrainerCallback

from selfreward.progress import Progress, Task

log = logging.getLogger(__name__)

# logged values copied into the progress fields (job meta, CLI bar); the logger gets them all
PROGRESS_METRICS = ("loss", "rewards/margins")
LOGGED_METRICS = ("loss", "learning_rate", "rewards/margins", "rewards/accuracies", "mean_token_accuracy")


class ProgressCallback(TrainerCallback):
    """Reports step, total steps, loss and ETA through `selfreward.progress` (main process only).

    Event fields: done/total = step/total steps, eta_s, loss (DPO: rewards/margins too), and
    resumed_from_step when the job resumed from a checkpoint.

    The ETA uses the pace of this session, so a job resumed at step 40 of 100 does not count the
    40 restored steps as if they had just been done.
    """

    def __init__(self, progress: Progress, task_name: str) -> None:
        self.progress = progress
        self.task_name = task_name
        self.task: Task | None = None
        self.first_step = 0
        self.started = 0.0

    def _eta(self, state: Any) -> float | None:
        done = state.global_step - self.first_step
        if done <= 0 or not state.max_steps:
            return None
        return round((time.monotonic() - self.started) / done * (state.max_steps - state.global_step), 1)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.first_step = state.global_step
        self.started = time.monotonic()
        if not state.is_world_process_zero:
            return
        self.task = self.progress.task(self.task_name, total=state.max_steps, done=state.global_step)
        self.task.update(step=state.global_step, total_steps=state.max_steps)
        if state.global_step:
            self.task.update(resumed_from_step=state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # a step that logs is shown by on_log, with its own loss (shown here, the throttled API
        # sink would drop on_log's update and show the previous logged step's loss beside it)
        if self.task is not None and not getattr(control, "should_log", False):
            self.task.update(done=state.global_step, step=state.global_step, eta_s=self._eta(state))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if self.task is None or not logs:
            return
        values = {k: float(logs[k]) for k in LOGGED_METRICS if isinstance(logs.get(k), int | float)}
        if not values:
            return
        self.task.update(
            done=state.global_step,
            step=state.global_step,
            eta_s=self._eta(state),
            **{k: v for k, v in values.items() if k in PROGRESS_METRICS},
        )
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        log.info("%s step %d/%d %s", self.task_name, state.global_step, state.max_steps, shown)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.task is not None:
            self.task.update(done=state.global_step, step=state.global_step, eta_s=0.0)
            self.task.close()


def tensorboard_callback(log_dir: str) -> TrainerCallback:
    """TensorBoard writer into `log_dir` (transformers 5 has no `logging_dir` argument any more)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=log_dir))


class ThroughputCallback(TrainerCallback):
    """Steps, input tokens (non-padding) and wall time of this session, for the manifest."""

    def __init__(self) -> None:
        self.first_step = 0
        self.first_tokens = 0
        self.started = 0.0
        self.seconds = 0.0
        self.steps = 0
        self.tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.first_step = state.global_step
        self.first_tokens = int(state.num_input_tokens_seen or 0)
        self.started = time.monotonic()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds = time.monotonic() - self.started
        self.steps = state.global_step - self.first_step
        self.tokens = int(state.num_input_tokens_seen or 0) - self.first_tokens
