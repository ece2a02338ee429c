"""The train/eval split of seed trees: a salted hash of the tree id, stable everywhere.

Rule (docs/data.md): u = int(sha256(f"{salt}:{tree_id}")[:16], 16) / 2**64, a number in
[0, 1) that depends only on the salt and the tree id; the tree is in the eval split when
u < eval_fraction. Changing the salt draws another split; raising eval_fraction only moves
trees from train to eval. The same u orders the records of every output file, so a cap
(`max_ift`, ...) keeps a pseudo-random but reproducible subset.
"""

from __future__ import annotations

import hashlib

SCALE = float(2**64)


def split_key(salt: str, tree_id: str) -> float:
    """The tree's position in [0, 1) under this salt."""
    digest = hashlib.sha256(f"{salt}:{tree_id}".encode()).hexdigest()
    return int(digest[:16], 16) / SCALE


def is_eval(salt: str, tree_id: str, eval_fraction: float) -> bool:
    return split_key(salt, tree_id) < eval_fraction
