"""Where a run's saved state goes, and when a run may continue from it.

A run writing OUTPUT (`collect_stats`, `collect_ranges` with `checkpoint=`) saves its state to
OUTPUT.checkpoint.npz as it goes; under torchrun each rank R of several saves its own,
OUTPUT.checkpoint.rankR.npz. Continuing (`resume`) needs that file; starting afresh while one exists
is refused, so the state of an interrupted run is never silently discarded. The file is removed once
the run's result has been written.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from onnxbn import distributed
from onnxbn.errors import UserError


def checkpoint_path(output: str | os.PathLike, rank: int = 0, ranks: int = 1) -> Path:
    """OUTPUT.checkpoint.npz, or OUTPUT.checkpoint.rankR.npz for rank R of several."""
    return Path(f"{output}.checkpoint.npz" if ranks == 1 else f"{output}.checkpoint.rank{rank}.npz")


@contextlib.contextmanager
def checkpointed(output: str | os.PathLike, resume: bool) -> Iterator[Path]:
    """The checkpoint path of this process's run writing `output`, after the rules above (a UserError:
    `resume` without a checkpoint, or a checkpoint left by an interrupted run without `resume`); the
    checkpoint is removed when the block ends without an exception (write the result inside it)."""
    checkpoint = checkpoint_path(output, *distributed.world())
    if resume and not checkpoint.is_file():
        raise UserError(f"--resume: no checkpoint {checkpoint} to continue from; run without --resume")
    if not resume and checkpoint.is_file():
        raise UserError(f"{checkpoint} exists from an interrupted run: add --resume to continue it, or delete it")
    yield checkpoint
    checkpoint.unlink(missing_ok=True)
