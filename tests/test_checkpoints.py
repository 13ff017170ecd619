"""The checkpoint rules of a run writing OUTPUT, through the Python API: the path per rank, resume needs
the file, a left-over file needs resume, the file goes once the block ends without an exception."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxbn.checkpoints import checkpoint_path, checkpointed
from onnxbn.errors import UserError


def test_checkpoint_path_per_rank(tmp_path):
    out = tmp_path / "s.npz"
    assert checkpoint_path(out) == Path(f"{out}.checkpoint.npz")
    assert checkpoint_path(out, 1, 4) == Path(f"{out}.checkpoint.rank1.npz")


def test_checkpointed_rules(tmp_path):
    out = tmp_path / "s.npz"
    saved = Path(f"{out}.checkpoint.npz")
    with pytest.raises(UserError, match=r"--resume: no checkpoint .*s.npz.checkpoint.npz to continue from"):
        with checkpointed(out, resume=True):
            pass
    with pytest.raises(RuntimeError), checkpointed(out, resume=False) as path:  # interrupted: the state stays
        assert path == saved
        path.write_bytes(b"state")
        raise RuntimeError("interrupted")
    assert saved.read_bytes() == b"state"
    with pytest.raises(UserError, match="exists from an interrupted run: add --resume to continue it, or delete it"):
        with checkpointed(out, resume=False):
            pass
    with checkpointed(out, resume=True) as path:  # continued and finished: the checkpoint goes
        assert path.read_bytes() == b"state"
    assert not saved.exists() and list(tmp_path.iterdir()) == []
