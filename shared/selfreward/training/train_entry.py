"""Entry point of every process `accelerate launch` starts (see launch.py).

    accelerate launch --config_file CONFIG -m selfreward.training.train_entry \
        --request REQUEST.json [--progress PROGRESS.jsonl]

Each process trains its share (`runner.fit`); the main process writes the model folder and, with
`--progress`, appends its progress events to that file for the job to relay.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from selfreward.errors import SelfRewardError
from selfreward.progress import NULL_PROGRESS, Progress

from .launch import ProgressFileSink
from .request import TrainRequest
from .runner import fit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfreward.training.train_entry")
    parser.add_argument("--request", type=Path, required=True, help="TrainRequest JSON written by the job")
    parser.add_argument("--progress", type=Path, default=None, help="progress events file (main process)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    try:
        request = TrainRequest.model_validate_json(args.request.read_text(encoding="utf-8"))
        progress = Progress(ProgressFileSink(args.progress)) if args.progress and rank == 0 else NULL_PROGRESS
        fit(request, progress)
    except SelfRewardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
