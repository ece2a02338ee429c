"""Seed data: OASST1 readers (both formats), the tree-hash split, IFT/EFT builders, EFT targets.

Entry point: `prepare_seed(DataConfig, out_dir)` (the CLI: `selfreward data prepare`).
Chat examples for training: `ift_messages(record)`, `eft_messages(record)`.
"""

from selfreward.data.chat import eft_messages, ift_messages, judge_target, justification_of
from selfreward.data.oasst import demo_path, open_source, read_source
from selfreward.data.seed import SeedManifest, prepare_seed
from selfreward.data.split import is_eval, split_key
from selfreward.data.targets import JudgeVerdict, rank_score

__all__ = [
    "JudgeVerdict",
    "SeedManifest",
    "demo_path",
    "eft_messages",
    "ift_messages",
    "is_eval",
    "judge_target",
    "justification_of",
    "open_source",
    "prepare_seed",
    "rank_score",
    "read_source",
    "split_key",
]
