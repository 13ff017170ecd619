"""torchrun on CPU (gloo): sharded statistics and DistributedDataParallel fine-tuning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import small_cnn
from onnx import numpy_helper

import onnxbn
from onnxbn.stats import load_stats

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "onnxbn", "-q"]


def torchrun(*argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(TORCHRUN + [str(a) for a in argv], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_stats_equal_a_single_process(tmp_path):
    model = small_cnn()
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((37, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    torchrun("stats", tmp_path / "m.onnx", "--data", tmp_path / "x.npz", "--after", "relu", "-o", tmp_path / "d.npz",
             cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.onnx", "x.npz"]  # one file, no leftovers
    single = onnxbn.collect_stats(model, x, after="relu")
    merged = load_stats(tmp_path / "d.npz")
    assert merged.meta["samples"] == 37 and merged.meta["shard"] == "torchrun x2"
    for name in single.tensors:
        np.testing.assert_allclose(merged.mean(name), single.mean(name), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(merged.var(name), single.var(name), rtol=1e-12, atol=1e-15)


def bn_model_and_data(tmp_path):
    """A small CNN with BN after its dense layers, 32 labelled samples; both saved in tmp_path."""
    model = small_cnn()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    bn = onnxbn.insert_bn(model, onnxbn.collect_stats(model, x, after="dense"))
    onnx.save(bn, str(tmp_path / "bn.onnx"))
    np.savez(tmp_path / "train.npz", x=x, y=y)
    return bn, x, y


def test_torchrun_finetune_equals_one_process_with_the_same_global_batch(tmp_path):
    """SyncBN on, dropout off, global batch = the whole set (so both see the same batches).

    SGD: Adam divides by sqrt(v) and so turns float rounding in near-zero gradients
    into visible differences; SGD keeps them at rounding level."""
    bn, x, y = bn_model_and_data(tmp_path)
    args = ["--train", tmp_path / "train.npz", "--epochs", "3", "--lr", "1e-2", "--batch-size", "32",
            "--dropout", "0", "--sync-bn", "--device", "cpu", "--optimizer", "sgd"]
    torchrun("finetune", tmp_path / "bn.onnx", *args, "-o", tmp_path / "ddp.onnx", cwd=tmp_path)
    single = onnxbn.finetune(bn, (x, y), epochs=3, lr=1e-2, batch_size=32, dropout=0.0, device="cpu",
                             optimizer="sgd")
    ddp = onnx.load(str(tmp_path / "ddp.onnx"))
    log = json.loads((tmp_path / "ddp.onnx.log.json").read_text())
    assert log["ranks"] == 2 and log["sync_bn"] is True
    assert not list(tmp_path.glob("*.rank*")) and sorted(p.name for p in tmp_path.iterdir()) == \
        ["bn.onnx", "ddp.onnx", "ddp.onnx.log.json", "train.npz"]  # only rank 0 wrote
    a = {t.name: numpy_helper.to_array(t) for t in single.model.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in ddp.graph.initializer}
    changed = [k for k in a if not np.array_equal(a[k], numpy_helper.to_array(
        next(t for t in bn.graph.initializer if t.name == k)))]
    assert "f3.w" in changed and any("mean" in k for k in changed)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert log["history"][-1]["train_loss"] == pytest.approx(single.log["history"][-1]["train_loss"], rel=1e-5)


def test_without_sync_bn_ranks_normalise_with_their_own_half(tmp_path):
    """The control for the test above: plain BN under DDP sees 16 of the 32 samples."""
    bn, x, y = bn_model_and_data(tmp_path)
    torchrun("finetune", tmp_path / "bn.onnx", "--train", tmp_path / "train.npz", "--epochs", "1", "--lr", "1e-2",
             "--batch-size", "32", "--dropout", "0", "--device", "cpu", "--optimizer", "sgd",
             "-o", tmp_path / "ddp.onnx", cwd=tmp_path)
    single = onnxbn.finetune(bn, (x, y), epochs=1, lr=1e-2, batch_size=32, dropout=0.0, device="cpu", optimizer="sgd")
    a = {t.name: numpy_helper.to_array(t) for t in single.model.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "ddp.onnx")).graph.initializer}
    assert not np.allclose(b["f2.w"], a["f2.w"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gpus, backend, device", [(0, "gloo", None), (1, "gloo", None), (2, "cpu:gloo,cuda:nccl", 1)])
def test_nccl_only_when_every_rank_on_the_machine_has_a_gpu_of_its_own(monkeypatch, gpus, backend, device):
    """Two ranks: gloo on a CPU machine and where they would share one GPU (nccl refuses that); with a GPU
    each, nccl for CUDA tensors and gloo for the CPU's (object gathers, --device cpu)."""
    import torch
    import torch.distributed as dist

    from onnxbn import distributed

    started, chosen = {}, []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("ONNXBN_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(dist, "init_process_group", lambda name: started.setdefault("backend", name))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    assert distributed.world() == (1, 2)
    assert started["backend"] == backend
    assert chosen == ([] if device is None else [device])
