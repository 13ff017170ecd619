"""Fine-tuning in torch: train-step, feature-cache, data-pipeline."""

from __future__ import annotations

import numpy as np

from .context import Context, torch_vgg, write_jpegs
from .harness import Result, alternate, median, now, row

# ----------------------------------------------------------------------------- 4. train-step

def _copy_weights(imported, hand) -> int:
    """Copy conv/linear/BN parameters and BN buffers from the import to the hand-written net, in order."""
    import torch
    from torch import nn

    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)
    src = [imported.get_submodule(n.target) for n in imported.graph.nodes if n.op == "call_module"]
    src = [m for m in src if isinstance(m, kinds)]
    dst = [m for m in hand.modules() if isinstance(m, kinds)]
    if [type(m) for m in src] != [type(m) for m in dst]:
        raise RuntimeError(f"layer mismatch: import {[type(m).__name__ for m in src]} vs hand-written "
                           f"{[type(m).__name__ for m in dst]}")
    with torch.no_grad():
        for s, d in zip(src, dst, strict=True):
            d.load_state_dict(s.state_dict())
    return len(src)


def bench_train_step(ctx: Context) -> Result:
    import torch

    import onnxbn

    p = ctx.profile
    bn_model = ctx.bn_model("linear")
    has_dropout = any(n.op_type == "Dropout" for n in bn_model.graph.node)
    imported = onnxbn.to_torch(bn_model)
    hand = torch_vgg(p, bn=True, dropout=0.5 if has_dropout else 0.0)
    layers = _copy_weights(imported, hand)
    x = torch.from_numpy(ctx.arrays(p.train_batch, seed=3))
    y = torch.randint(0, p.classes, (p.train_batch,), generator=torch.Generator().manual_seed(0))
    imported.eval()
    hand.eval()
    with torch.no_grad():
        a, b = imported(x), hand(x)
    agreement = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    if not agreement <= 1e-4:
        raise RuntimeError(f"hand-written VGG-BN differs from the import by {agreement:.3g} relative")

    def stepper(model):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def fn():
            t = now()
            for _ in range(p.train_steps):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            return (now() - t) / p.train_steps
        return fn

    raw = alternate({"import": stepper(imported), "hand": stepper(hand)}, ctx.reps)
    ratio = median(raw["hand"]) / median(raw["import"])  # throughput ratio import / hand
    rows = [row("to_torch(VGG+BN linear)", raw["import"], "img/s", ratio, per=p.train_batch, role="subject"),
            row("hand-written torch VGG-BN", raw["hand"], "img/s", 1.0, per=p.train_batch, role="reference")]
    return Result("train-step", "import >= 0.95x hand-written throughput", rows, ratio, ratio >= 0.95,
                  [f"{p.description}; batch {p.train_batch}; forward+backward+SGD(momentum) step; "
                   f"{layers} layers copied; eval outputs agree to {agreement:.1e} relative; "
                   f"dropout {'on' if has_dropout else 'absent'} in both; torch threads {torch.get_num_threads()}"],
                  {"eval_agreement": agreement})


# ----------------------------------------------------------------------------- 5. feature-cache

def bench_feature_cache(ctx: Context) -> Result:
    import shutil

    import torch

    import onnxbn
    from onnxbn.torch_import import split_at
    from onnxbn.training import default_freeze_node

    p = ctx.profile
    bn_model = ctx.bn_model("dense")
    x = ctx.arrays(p.cache_samples, seed=4)
    y = np.random.default_rng(5).integers(0, p.classes, p.cache_samples).astype(np.int64)
    cache = ctx.workdir / "feature-cache"
    shutil.rmtree(cache, ignore_errors=True)
    node = default_freeze_node(bn_model)
    batch = p.cache_batch
    totals: list[float] = []
    first_epochs: list[float] = []

    def run_cached():
        # two epochs per call: the second is the steady state (the first also allocates Adam's
        # state and warms autograd up, which the uncached path, reusing its module, does once)
        t = now()
        result = onnxbn.finetune(bn_model, (x, y), epochs=2, batch_size=batch, cache=cache, device="cpu",
                                 freeze_through=node, seed=0)
        totals.append(now() - t)
        first_epochs.append(result.log["history"][0]["seconds"])
        return result.log["history"][-1]["seconds"]

    module = onnxbn.to_torch(bn_model)
    prefix, suffix = split_at(module, node)
    module.requires_grad_(False)
    trainable = list(suffix.parameters())
    for param in trainable:
        param.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=1e-5, fused=True)  # the optimizer finetune uses
    rng = np.random.default_rng(0)

    def run_uncached():
        module.train()
        prefix.eval()
        t = now()
        order = rng.permutation(len(y))
        for start in range(0, len(order), batch):
            rows_ = np.sort(order[start:start + batch])
            out = module(torch.from_numpy(x[rows_]))
            loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(y[rows_]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return now() - t

    # the one-off caching cost, measured on its own: the frozen prefix over the data into a fresh cache
    from onnxbn.feeding import model_input, open_model_data
    from onnxbn.runtimes.ort_backend import make_session
    from onnxbn.training import cached_features, split_model

    prefix_model, _, cut = split_model(bn_model, node)  # finetune's prefix: the ONNX graph in onnxruntime
    ort_prefix = (make_session(prefix_model, "cpu"), model_input(bn_model)[0], cut)
    t = now()
    cached_features(ort_prefix, open_model_data(bn_model, (x, y)), "bench", ctx.workdir / "feature-cache-once",
                    batch, 0, "features", model_input(bn_model)[2])
    caching = now() - t
    shutil.rmtree(ctx.workdir / "feature-cache-once", ignore_errors=True)
    t = now()
    run_cached()  # fills finetune's cache: later calls hit it
    first_total = now() - t
    totals.clear()
    first_epochs.clear()
    run_uncached()  # warm-up
    raw = alternate({"cached": run_cached, "uncached": run_uncached}, ctx.reps, warmup=False)
    hit_total = median(totals)
    ratio = median(raw["uncached"]) / median(raw["cached"])
    rows = [row("finetune epoch on cached features", raw["cached"], "s", 1.0 / ratio, role="subject"),
            row("epoch through the full network", raw["uncached"], "s", 1.0, role="reference"),
            row("one-off feature caching (cached_features)", [caching], "s", caching / median(raw["uncached"])),
            row("finetune first epoch (cold optimizer)", first_epochs, "s", median(first_epochs) / median(raw["uncached"])),
            row("finetune call total, 2 epochs (cache hit)", totals, "s", hit_total / median(raw["uncached"]))]
    return Result("feature-cache", "cached epoch >= 10x faster", rows, ratio, ratio >= 10,
                  [f"{p.description}; {p.cache_samples} samples, batch {batch}, Adam on the part after "
                   f"{node!r}; cached epoch time from finetune's own log; caching timed on "
                   "onnxbn.training.cached_features into a fresh folder; cached epoch = 2nd epoch of a finetune call"],
                  {"first_call_total_s": first_total, "freeze_through": node})


# ----------------------------------------------------------------------------- 6. data-pipeline

def bench_data_pipeline(ctx: Context) -> Result:
    import onnxbn
    from onnxbn.data.images import default_workers
    from onnxbn.feeding import open_model_data

    p = ctx.profile
    n = p.pipeline_images
    folder = write_jpegs(ctx.workdir / f"jpeg-{p.name}-{n}", n, p.jpeg_size)
    model, name = ctx.model, ctx.input_name()
    workers = default_workers()
    x = ctx.arrays(n)

    def run_stats():
        t = now()
        onnxbn.collect_stats(model, folder, after="dense", batch_size=p.batch, workers=workers, device="cpu")
        return now() - t

    def run_decode():
        t = now()
        for _ in open_model_data(model, folder).batches(p.batch, workers):
            pass
        return now() - t

    def run_infer():
        t = now()
        session = ctx.session(model)
        for i in range(0, n, p.batch):
            session.run(None, {name: x[i:i + p.batch]})
        return now() - t

    raw = alternate({"stats": run_stats, "decode": run_decode, "infer": run_infer}, ctx.reps)
    rate = {k: n / median(v) for k, v in raw.items()}
    slower = min(rate["decode"], rate["infer"])
    serial = 1.0 / (1.0 / rate["decode"] + 1.0 / rate["infer"])
    ratio = rate["stats"] / slower
    ref = "decode" if rate["decode"] <= rate["infer"] else "inference"
    rows = [row("collect_stats on JPEG folder", raw["stats"], "img/s", ratio, per=n, role="subject"),
            row(f"decode only (Dataset.batches, {workers} workers)", raw["decode"], "img/s",
                rate["decode"] / slower, per=n, role="reference" if ref == "decode" else ""),
            row("inference only (plain ORT)", raw["infer"], "img/s", rate["infer"] / slower, per=n,
                role="reference" if ref == "inference" else "")]
    return Result("data-pipeline", "stats >= 0.90x the slower of decode / inference", rows, ratio, ratio >= 0.90,
                  [f"{n} JPEGs {p.jpeg_size[0]}x{p.jpeg_size[1]}, batch {p.batch}, {workers} decode workers; "
                   f"slower stage: {ref}; no-overlap (serial) rate would be {serial:.2f} img/s; "
                   "session / pool start-up included"],
                  {"serial_rate": serial, "rates": rate})
