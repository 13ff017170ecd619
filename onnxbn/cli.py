"""The `onnxbn` command line: one small function per subcommand, its docstring is its help.

Exit codes: 0 success, 1 a check found a difference (and only that), 2 any error: bad
input or usage (one line on stderr saying what and how to fix it; a model onnxruntime
refuses, a folder given as an output file, running out of memory and a tensor too large
to allocate are bad input), or an unexpected failure (one line naming the command, the
traceback in a log file whose path it gives; --debug shows the traceback instead), 130
interrupted. onnxruntime's own log lines are kept off stderr (runtimes.ort_backend.quiet_onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from onnxbn.check.activations import LAYERWISE_SAMPLES, MAX_MARKED
from onnxbn.data.images import PRESETS
from onnxbn.errors import UserError
from onnxbn.runtimes.ort_backend import DEVICES, quiet_onnxruntime

log = logging.getLogger("onnxbn")
COMMANDS: dict[str, tuple] = {}


def arg(*names, **options):
    return names, options


def command(*arguments):
    """Register `cmd_<name>` as subcommand <name> with these arguments (lists and groups are flattened)."""
    flat = []
    for a in arguments:
        flat.extend(a.arguments if isinstance(a, InputData) else a if isinstance(a, list) else [a])

    def register(fn):
        COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = (fn, flat)
        return fn
    return register


# ----------------------------------------------------------------------------- shared argument groups

OUTPUT = [arg("-o", "--output", required=True, help="output path (written atomically)"),
          arg("--force", action="store_true", help="allow the output to replace an input file")]
# every argument naming an output file: an existing folder there is refused before any work (main)
OUTPUT_FILES = {"output": "-o", "report": "--report", "junit": "--junit", "summary_md": "--summary-md",
                "plot": "--plot", "node_data": "--node-data"}
DEVICE = [arg("--device", default="auto", choices=DEVICES, help="where to run (default: auto)")]
SELECTOR = arg("--after", default="dense",
               help="where BN goes: dense (default), conv, relu, linear, or tensor names, comma separated")


class InputData:
    """The input-data argument group: --data, --random, --limit, --seed, --batch-size, --preset,
    --workers, --strict, --min-samples. It adds its own arguments and parses them into the keyword
    arguments of the API call (`options(args)`), validating them once for every command."""

    def __init__(self, *, required: bool = False, random: bool = False, workers: str = "in-process",
                 data_help: str = "image folder or .npz (x, optional y)", batch_size: int = 32,
                 verified: bool = False):
        self.random, self.workers, self.verified = random, workers, verified
        self.arguments = [arg("--data", required=required, help=data_help)]
        if random:
            self.arguments.append(arg("--random", type=int, help="N seeded normal inputs instead of --data (default: 8)"))
        self.arguments += [
            arg("--batch-size", type=int, default=batch_size, help=f"samples per batch (default: {batch_size})"),
            arg("--limit", type=int, help="use a seeded, class-balanced random sample of N items"),
            arg("--seed", type=int, default=0,
                help="seed for --limit" + (" and --random" if random else "") + " (default: 0)"),
            arg("--preset", choices=PRESETS, help="image preprocessing (default: from the model's metadata, else imagenet)"),
            arg("--workers", type=int, help="image decoding processes (default: the core count, at most 8; 0 = in-process)"
                if workers == "pool" else "image decoding processes (default: 0: decode in-process, "
                "interleaved with inference; N > 0 decodes N batches ahead in N processes)"),
            arg("--strict", action="store_true", help="fail on an unreadable image instead of skipping it"),
        ]
        if verified:
            self.arguments.append(arg("--min-samples", type=int, default=1,
                                      help="fail (exit 2) unless at least N samples were compared (default: 1)"))

    def options(self, args) -> dict:
        if self.random and args.data is not None and args.random is not None:
            raise UserError("give either --data or --random, not both")
        if self.verified and args.min_samples < 1:
            raise UserError(f"--min-samples must be at least 1 (got {args.min_samples})")
        opts = {"data": args.data, "batch_size": args.batch_size, "limit": args.limit, "seed": args.seed,
                "preset": args.preset, "workers": args.workers if args.workers is not None else
                (None if self.workers == "pool" else 0), "strict": args.strict}
        if self.random:
            opts["random"] = args.random
        if self.verified:
            opts["min_samples"] = args.min_samples
        return opts


def _write_json(path: str, payload: dict, inputs=()) -> None:
    from onnxbn.io.save import atomic_path, refuse_overwrite

    refuse_overwrite(path, inputs)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- commands

@command(arg("arch", choices=["vgg11", "vgg13", "vgg16", "vgg19"], help="architecture"),
         arg("--weights", help="local torchvision state_dict (.pth); random weights without it"),
         arg("--opset", type=int, default=17, help="ONNX opset (default: 17)"),
         arg("--image-size", type=int, default=224, help="input height and width (default: 224)"),
         OUTPUT)
def cmd_export(args) -> int:
    """Export a torchvision-layout VGG to ONNX, checked against torch (dynamic batch axis)."""
    from onnxbn.export import export_vgg
    from onnxbn.io.save import refuse_overwrite, save_model

    refuse_overwrite(args.output, [args.weights] if args.weights else [], args.force)
    model = export_vgg(args.arch, weights=args.weights, opset=args.opset, image_size=args.image_size)
    save_model(model, args.output, inputs=[args.weights] if args.weights else [], force=args.force)
    log.info("wrote %s (%s, %.1f MB)", args.output, args.arch, Path(args.output).stat().st_size / 1e6)
    return 0


@command(arg("model", help="ONNX model"), SELECTOR, arg("--json", action="store_true", help="print JSON"))
def cmd_points(args) -> int:
    """List the tensors a selector picks: producer op, channel count and shape."""
    from onnxbn.io.load import load_model
    from onnxbn.points import select_points

    points = select_points(load_model(args.model), args.after)
    if args.json:
        print(json.dumps([p.to_dict() for p in points], indent=2))
        return 0
    rows = [("tensor", "producer", "channels", "shape")]
    rows += [(p.tensor, p.producer_op, str(p.channels or "?"), "x".join(str(d or "?") for d in p.shape or []))
             for p in points]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


STATS_DATA = InputData(required=True, workers="pool")


@command(arg("model", help="ONNX model"), SELECTOR, STATS_DATA, DEVICE,
         arg("--shard", help="process shard I of N (I/N) of the data; combine with `onnxbn merge`"),
         arg("--resume", action="store_true", help="continue an interrupted run from OUTPUT.checkpoint.npz"),
         arg("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
             help="save the accumulated state this often (default: 60; 0 = every batch)"),
         arg("--ranges", action="store_true", help="write min/max and histograms of every float activation (for "
             "`onnxbn quantize --ranges`) instead of BN moments; --after is not used"),
         arg("--export-table", choices=["ort", "tensorrt"], help="with --ranges: write a calibration table instead "
             "of the ranges file: ort (-o a folder: onnxruntime's calibration.json/.flatbuffers/.cache) or tensorrt "
             "(-o a TensorRT INT8 calibration cache)"),
         arg("--method", choices=["minmax", "percentile", "entropy", "mse"], default="minmax",
             help="with --export-table: the tensors' ranges (default: minmax)"),
         arg("--percentile", type=float, default=99.99, help="with --method percentile (default: 99.99)"),
         OUTPUT)
def cmd_stats(args) -> int:
    """Gather per-channel mean and variance of the selected tensors over a calibration set.

    The run saves its state to OUTPUT.checkpoint.npz as it goes (removed on success);
    after an interruption, the same command with --resume continues where it stopped
    and gives the same result. Under torchrun, every rank takes a shard of the data
    and rank 0 writes the merged file."""
    from onnxbn import distributed
    from onnxbn.checkpoints import checkpointed
    from onnxbn.insert import dead_channels
    from onnxbn.io.save import refuse_overwrite
    from onnxbn.stats import collect_stats

    rank, ranks = distributed.world()
    refuse_overwrite(args.output, [args.model, args.data], args.force)
    with checkpointed(args.output, args.resume) as checkpoint:
        if args.ranges:
            return _stats_ranges(args, ranks, checkpoint)
        if args.export_table:
            raise UserError("--export-table writes a table of activation ranges: add --ranges")
        stats = collect_stats(args.model, after=args.after, device=args.device, shard=args.shard,
                              checkpoint=checkpoint, resume=args.resume, checkpoint_every=args.checkpoint_every,
                              **STATS_DATA.options(args))
        if rank == 0:
            stats.save(args.output, inputs=[args.model, args.data], force=args.force)
    if rank != 0:
        return 0
    meta, dead = stats.meta, dead_channels(stats)
    log.info("%d tensors, %d samples in %.1fs on %s; %d dead channels; wrote %s", len(stats.tensors), meta["samples"],
             meta["seconds"], meta["provider"], sum(dead.values()), args.output)
    if meta["skipped"]:
        log.warning("skipped %d unreadable image(s), e.g. %s", meta["skipped"], meta["skipped_files"][0])
    return 0


def _stats_ranges(args, ranks: int, checkpoint: Path) -> int:
    from onnxbn.ranges import collect_ranges

    if ranks > 1:
        raise UserError("--ranges runs in one process: split the data with --shard I/N and `onnxbn merge` the files")
    if args.export_table is None and args.method != "minmax":
        raise UserError("--method chooses the ranges of --export-table; a ranges file keeps the histograms (give "
                        "--method to `onnxbn quantize`)")
    ranges = collect_ranges(args.model, device=args.device, shard=args.shard, checkpoint=checkpoint,
                            resume=args.resume, checkpoint_every=args.checkpoint_every,
                            histograms=args.export_table is None or args.method != "minmax", **STATS_DATA.options(args))
    if args.export_table:
        from onnxbn.calibration_tables import export_table

        export_table(ranges, args.export_table, args.output, method=args.method, percentile=args.percentile,
                     inputs=[args.model, args.data], force=args.force)
    else:
        ranges.save(args.output, inputs=[args.model, args.data], force=args.force)
    log.info("ranges of %d tensors, %d samples in %.1fs on %s; wrote %s", len(ranges.tensors), ranges.meta["samples"],
             ranges.meta["seconds"], ranges.meta["provider"], args.output)
    return 0


@command(arg("stats", nargs="+", help="stats files (shards of one run)"), OUTPUT)
def cmd_merge(args) -> int:
    """Merge stats files from shards of one run (Chan's formula, float64), or ranges files (`stats --ranges`)."""
    from onnxbn.ranges import is_ranges_file, merge_ranges
    from onnxbn.stats import merge_stats

    if is_ranges_file(args.stats[0]):
        merged = merge_ranges(args.stats)
        merged.save(args.output, inputs=args.stats, force=args.force)
        log.info("merged %d ranges files, %d samples; wrote %s", len(args.stats), merged.meta["samples"], args.output)
        return 0
    merged = merge_stats(args.stats)
    merged.save(args.output, inputs=args.stats, force=args.force)
    log.info("merged %d files, %d samples; wrote %s", len(args.stats), merged.meta["samples"], args.output)
    return 0


@command(arg("model", help="ONNX model"), arg("--stats", required=True, help="stats file from `onnxbn stats`"),
         arg("--eps", type=float, default=1e-5, help="BatchNormalization epsilon (default: 1e-5)"), OUTPUT)
def cmd_insert(args) -> int:
    """Splice identity BatchNormalization nodes at the tensors in the stats file."""
    from onnxbn.insert import dead_channels, insert
    from onnxbn.io.model import Model
    from onnxbn.io.save import refuse_overwrite
    from onnxbn.stats import load_stats

    refuse_overwrite(args.output, [args.model, args.stats], args.force)
    stats = load_stats(args.stats)
    model = insert(Model.open(args.model), stats, eps=args.eps)
    model.save(args.output, inputs=[args.model, args.stats], force=args.force)
    for name, dead in dead_channels(stats).items():
        log.info("  BN after %s: %d channels, %d dead (zero variance)", name, stats.mean(name).size, dead)
    log.info("inserted %d BatchNormalization nodes; wrote %s", len(stats.tensors), args.output)
    return 0


CHECK_DATA = InputData(random=True, data_help="image folder, .npz of inputs, or a folder in ONNX's test-data layout "
                       "(test_data_set_N/input_0.pb)", verified=True)
RUNTIME_HELP = "onnxruntime (default), openvino, tract or reference; NAME:DEVICE for onnxruntime:cuda"
PRECISION_CHOICES = ["default", "f32", "bf16", "f16"]
# check and fold: tolerances default to the precisions the two sides ran at (onnxbn.runtimes.precision.TOLERANCES)
RUNTIME_TOLERANCE = [
    arg("--atol", type=float, help="absolute tolerance (default: 1e-5; for a float16/bfloat16 model, or where a "
        "runtime computes in bf16, f16 or tf32, looser defaults that also scale with each sample's largest value: "
        "see the README; giving --atol or --rtol applies the plain rule |a-b| <= atol + rtol*|a|)"),
    arg("--rtol", type=float, help="relative tolerance (default: 1e-5; 3e-2 at bf16, 4e-3 at f16/tf32)")]
PRECISION = arg("--precision", choices=PRECISION_CHOICES,
                help="the candidate runtime's arithmetic: default (the runtime's own choice, reported), f32, "
                     "bf16, f16 (openvino; a hint the CPU cannot honour is reported as what ran)")


@command(arg("models", nargs="+", metavar="MODEL",
             help="REFERENCE CANDIDATE; REFERENCE alone with --save-outputs; CANDIDATE alone with --reference-outputs"),
         CHECK_DATA, RUNTIME_TOLERANCE,
         arg("--tolerances", metavar="FILE", help="per-output rules: JSON (or YAML with PyYAML installed) mapping an "
             "output name or glob to atol/rtol/scaled and gates max_abs, mean_abs, median_abs, p99_abs, max_rel, "
             "cosine, psnr, top1, top5; the first matching key wins"),
         arg("--save-outputs", metavar="FILE.npz|DIR", help="store the reference's outputs here as golden outputs "
             "(.npz, or a new folder in ONNX's test-data layout); the candidate is optional"),
         arg("--reference-outputs", metavar="FILE.npz|DIR", help="compare the candidate with golden outputs stored "
             "by --save-outputs (or an ONNX test-data folder) instead of running a reference model"),
         arg("--layerwise", action="store_true", help="also compare every shared activation (max, mean, p99 and "
             "relative error) and name the first divergence"),
         arg("--max-marked", type=int, default=MAX_MARKED, metavar="N", help="with --layerwise: at most N tensors "
             f"exposed per runtime session (more take more passes; default {MAX_MARKED})"),
         arg("--report", help="write the report as JSON here"), arg("--junit", help="write a JUnit XML report here"),
         arg("--summary-md", metavar="FILE", help="write a short Markdown summary here (also appended to "
             "$GITHUB_STEP_SUMMARY when that is set)"),
         arg("--plot", metavar="FILE.png", help="with --layerwise: draw max relative error per layer"),
         arg("--node-data", metavar="FILE.json", help="with --layerwise: per-node errors as Model Explorer node data"),
         DEVICE,
         arg("--runtime", help=f"run both models here: {RUNTIME_HELP}"),
         arg("--reference-runtime", help=f"run the reference here (default: onnxruntime): {RUNTIME_HELP}"),
         arg("--candidate-runtime", help=f"run the candidate here (default: onnxruntime): {RUNTIME_HELP}"),
         PRECISION,
         arg("--reference-precision", choices=PRECISION_CHOICES, default="f32",
             help="the reference runtime's arithmetic (default: f32)"))
def cmd_check(args) -> int:
    """Check that two models compute the same outputs: exit 0 pass, 1 mismatch, 2 error.

    Unreadable images are skipped and counted in the report (--strict fails on them); fewer
    than --min-samples compared samples (default 1) is an error, never a pass.

    Both models run on onnxruntime unless --runtime (both sides) or --reference-runtime /
    --candidate-runtime say otherwise: `onnxbn check m.onnx m.onnx --candidate-runtime openvino`
    checks one model on the runtime it ships to. The report names each side's runtime,
    version, device and the precision the runtime chose.

    Golden outputs for CI: `onnxbn check REF --data X --save-outputs golden.npz` runs the reference
    alone and stores its outputs, the inputs' digest, the model's sha256 and the runtime that ran;
    `onnxbn check --reference-outputs golden.npz CAND --data X` compares a candidate with them (exit
    2 when the data is not the data they were made from). A folder in ONNX's test-data layout
    works as either."""
    from onnxbn.check.comparison import compare, save_outputs
    from onnxbn.check.golden import load_outputs
    from onnxbn.io.save import atomic_path, refuse_overwrite

    options = CHECK_DATA.options(args)
    count = len(args.models)
    if args.save_outputs and args.reference_outputs:
        raise UserError("give --save-outputs (store a reference's outputs) or --reference-outputs (compare with "
                        "stored ones), not both")
    if args.reference_outputs and count != 1:
        raise UserError("with --reference-outputs give one model, the candidate")
    if not args.reference_outputs and count != 2 and not (args.save_outputs and count == 1):
        raise UserError("give two models, REFERENCE CANDIDATE (or REFERENCE alone with --save-outputs, CANDIDATE "
                        "alone with --reference-outputs)")
    inputs = [*args.models, args.data, args.reference_outputs, args.tolerances]
    for out in (args.report, args.junit, args.summary_md, args.plot, args.node_data):
        if out:
            refuse_overwrite(out, inputs)
    if (args.plot or args.node_data) and not args.layerwise:
        raise UserError("--plot and --node-data draw the layerwise errors: add --layerwise")
    if args.save_outputs and len(args.models) == 1:
        if args.tolerances or args.layerwise:
            raise UserError("--tolerances and --layerwise judge a candidate; with --save-outputs alone there is none")
        meta = save_outputs(args.models[0], args.save_outputs, device=args.device,
                            runtime=args.reference_runtime or args.runtime, precision=args.reference_precision,
                            **options)
        rt = meta["runtime"]
        print(f"saved the outputs of {args.models[0]} on {meta['samples']} samples ({meta['data']}) to "
              f"{args.save_outputs}: {rt['runtime']} {rt['version']} on {rt['device']}, {rt['precision']}; inputs "
              f"sha256 {meta['inputs_sha256'][:16]}, model sha256 {meta['model_sha256'][:16]}")
        return 0
    reference = load_outputs(args.reference_outputs) if args.reference_outputs else args.models[0]
    report = compare(reference, args.models[-1], atol=args.atol, rtol=args.rtol, device=args.device,
                     layerwise=args.layerwise, max_marked=args.max_marked, runtime=args.runtime,
                     reference_runtime=args.reference_runtime,
                     candidate_runtime=args.candidate_runtime, precision=args.precision,
                     reference_precision=args.reference_precision, tolerances=args.tolerances,
                     save_outputs=args.save_outputs, **options)
    print(report.table())
    if args.report:
        _write_json(args.report, report.to_dict(), inputs)
    if args.junit:
        with atomic_path(args.junit) as tmp:
            tmp.write_text(report.junit() + "\n")
    if args.summary_md:
        with atomic_path(args.summary_md) as tmp:
            tmp.write_text(report.markdown())
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as fh:  # GitHub's file: appended, as its docs ask
            fh.write(report.markdown() + "\n")
    if args.node_data:
        _write_json(args.node_data, report.node_data(), inputs)
    if args.plot:
        with atomic_path(args.plot, suffix=".png") as tmp:
            report.plot(tmp)
    return 0 if report.passed else 1


@command(arg("reference", help="reference ONNX model"), arg("candidate", help="candidate ONNX model"),
         arg("--data", required=True, help="image folder or .npz of inputs (the first --samples are used)"),
         arg("--samples", type=int, default=LAYERWISE_SAMPLES,
             help=f"inputs to reduce on, each fed its own values (default: {LAYERWISE_SAMPLES})"),
         arg("--preset", choices=PRESETS, help="image preprocessing (default: from the model's metadata, else imagenet)"),
         arg("-o", "--output", dest="repro", required=True,
             help="new folder for the repro: ref.onnx, cand.onnx, inputs.npz"),
         RUNTIME_TOLERANCE, DEVICE,
         arg("--runtime", help=f"run both models here: {RUNTIME_HELP}"),
         arg("--reference-runtime", help=f"run the reference here (default: onnxruntime): {RUNTIME_HELP}"),
         arg("--candidate-runtime", help=f"run the candidate here (default: onnxruntime): {RUNTIME_HELP}"),
         PRECISION,
         arg("--max-marked", type=int, default=MAX_MARKED, metavar="N",
             help=f"at most N tensors exposed per runtime session while finding the divergence (default: {MAX_MARKED})"))
def cmd_reduce(args) -> int:
    """Find the smallest subgraph on which the candidate still fails: exit 1 with a repro written, 0 when
    nothing fails, 2 on bad input.

    Starts from the first diverging shared tensor (as check --layerwise finds it), cuts both graphs
    to the nodes between one tensor every path to it passes through and that tensor, feeds each
    sample the reference's own value of that tensor, and grows the cut until the failure stays.
    Writes ref.onnx, cand.onnx and inputs.npz (keyed by the subgraph input's name) to the folder
    and prints the `onnxbn check` line that replays it."""
    from onnxbn.check.reduction import reduce

    result = reduce(args.reference, args.candidate, args.data, args.repro, atol=args.atol, rtol=args.rtol,
                    samples=args.samples, preset=args.preset, device=args.device, runtime=args.runtime,
                    reference_runtime=args.reference_runtime, candidate_runtime=args.candidate_runtime,
                    precision=args.precision, max_marked=args.max_marked)
    print(result.summary())
    if result.report is None:  # nothing fails
        return 0
    print(result.report.table())
    print(f"reproduce: {result.command}")
    return 1


@command(arg("model", help="ONNX model (typically with BN from `onnxbn insert`)"),
         arg("--train", required=True, help="labelled training data: image folder with class folders, or .npz with x, y"),
         arg("--val", help="labelled validation data"),
         arg("--epochs", type=int, default=1, help="epochs (default: 1, as the notebook)"),
         arg("--lr", type=float, default=1e-5, help="learning rate (default: 1e-5, the notebook's)"),
         arg("--optimizer", choices=["adam", "sgd"], default="adam", help="optimizer (default: adam)"),
         arg("--batch-size", type=int, default=64, help="samples per step (default: 64)"),
         arg("--freeze-through", default="auto",
             help="last frozen ONNX node (default: auto = the last convolution block's output)"),
         arg("--cache", help="feature cache folder, reused when model and data are unchanged (default: temporary)"),
         arg("--bf16", action="store_true", help="bfloat16 autocast for the trained part (off by default)"),
         arg("--dropout", type=float, help="override the model's dropout rate while training (0 = off)"),
         arg("--sync-bn", action="store_true", help="under torchrun: BN normalises with global-batch statistics"),
         arg("--limit", type=int, help="train on a seeded, class-balanced sample of N items"),
         arg("--seed", type=int, default=0, help="seed for shuffling, dropout and --limit (default: 0)"),
         arg("--workers", type=int, default=0, help="image decoding processes (default: 0, in-process)"),
         DEVICE, OUTPUT)
def cmd_finetune(args) -> int:
    """Fine-tune the layers after the frozen convolution blocks on cached features, write the weights back.

    Writes the model and, next to it, OUTPUT.log.json with per-epoch train/val loss and accuracy.
    Under `torchrun --nproc_per_node K`, trains with DistributedDataParallel (gloo on
    CPU, nccl on GPU); --batch-size is the global batch; rank 0 writes the files."""
    from onnxbn import distributed
    from onnxbn.io.save import refuse_overwrite
    from onnxbn.training import finetune_to_file

    log_path = args.output + ".log.json"
    inputs = [args.model, args.train, args.val]
    refuse_overwrite(log_path, inputs, args.force)
    result_log = finetune_to_file(
        args.model, args.output, args.train, args.val, force=args.force, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, freeze_through=args.freeze_through, cache=args.cache, device=args.device,
        seed=args.seed, optimizer=args.optimizer, bf16=args.bf16, workers=args.workers, limit=args.limit,
        dropout=args.dropout, sync_bn=args.sync_bn)
    if not distributed.is_main():
        return 0
    _write_json(log_path, result_log, inputs)
    before, after = result_log["val_before"], result_log["val_after"]
    if before and after:
        log.info("val loss %.4f -> %.4f, accuracy %.4f -> %.4f", before["loss"], after["loss"], before["accuracy"],
                 after["accuracy"])
    log.info("trained %d parameters after %s in %.1fs; wrote %s and %s", result_log["trainable_parameters"],
             result_log["freeze_through"], result_log["seconds"], args.output, log_path)
    return 0


EVAL_DATA = InputData(required=True, data_help="labelled data (class folders or .npz with y)")


@command(arg("model", help="ONNX model"), EVAL_DATA, arg("--json", action="store_true", help="print JSON"), DEVICE)
def cmd_eval(args) -> int:
    """Cross-entropy loss and top-1/top-5 accuracy through onnxruntime."""
    from onnxbn.training import evaluate

    result = evaluate(args.model, device=args.device, **EVAL_DATA.options(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        skipped = f", {result['skipped']} unreadable skipped" if result["skipped"] else ""
        print(f"loss {result['loss']:.4f}  top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}  "
              f"({result['samples']} samples{skipped}, the output read as {result['output']} ({result['output_read_by']}), "
              f"onnxruntime on {result['provider']})")
    return 0


FOLD_DATA = InputData(random=True, data_help="verify on these inputs (image folder or .npz) instead of --random",
                      verified=True)


@command(arg("model", help="ONNX model with BatchNormalization nodes"), FOLD_DATA, RUNTIME_TOLERANCE,
         arg("--json", action="store_true", help="print the per-BN decisions and the check as JSON"),
         DEVICE,
         arg("--verify-on", action="append", metavar="RUNTIME",
             help=f"also check the folded model on this runtime (repeatable): {RUNTIME_HELP}"),
         PRECISION, OUTPUT)
def cmd_fold(args) -> int:
    """Fold BatchNormalization into neighbouring Conv/Gemm layers for deployment, verified.

    The folded model is compared with the input through onnxruntime and written only
    when every output is within tolerance (exit 1 otherwise). Each --verify-on RUNTIME
    also runs the folded model there against the unfolded one on onnxruntime
    (--precision: the arithmetic asked of the runtimes that take one, e.g. openvino);
    the model is written only when every check passes."""
    from onnxbn.deploy import fold_verified

    result = fold_verified(args.model, args.output, verify_on=args.verify_on or [], atol=args.atol, rtol=args.rtol,
                           precision=args.precision, device=args.device, force=args.force, **FOLD_DATA.options(args))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for d in result.decisions:
            print(f"{d['bn']}: " + (f"folded into {d['into']} ({d['direction']})" if d["action"] == "folded"
                                    else f"kept: {d['reason']}"))
        print(result.check.table())
        for spec, r in result.verify_on.items():
            print(f"\nverify on {spec}:\n{r.table()}")
    if not result.written:
        log.error("the folded model differs from the input beyond tolerance on %s; nothing written",
                  ", ".join(result.failed))
        return 1
    kept = sum(d["action"] == "kept" for d in result.decisions)
    log.info("folded %d of %d BatchNormalization nodes (%d kept); wrote %s", len(result.decisions) - kept,
             len(result.decisions), kept, args.output)
    return 0


RECALIBRATE_DATA = InputData(required=True, workers="pool", data_help="data to recalibrate on, labels unused "
                             "(image folder or .npz with x)")


@command(arg("model", help="ONNX model with BatchNormalization nodes"), RECALIBRATE_DATA,
         arg("--mode", choices=["exact", "batch"], default="exact",
             help="exact (default): the statistics the eval-mode model sees, level by level; batch: one "
                  "training-mode pass, as torch's update_bn"),
         arg("--nodes", help="BatchNormalization node names, comma separated (default: all)"),
         arg("--cache-mb", type=float, default=1024.0,
             help="exact mode: keep up to this many MiB of activations between passes (default: 1024; 0 = none)"),
         arg("--prior", default="2n",
             help="the old statistics count as this many samples against the n new images (mean and variance of "
                  "the mixture), a number or a multiple of n (default 2n: keeps a narrow in-domain set from "
                  "hurting; 0: the new statistics only, to adapt to a shift). BNs whose old mean/var are computed "
                  "at run time keep the new ones. auto (needs --eval): the best of 0, n/4, n, 2n, 4n, 16n on --eval"),
         arg("--eval", dest="eval_data", metavar="DATA",
             help="labelled data (class folders or .npz with x, y): top-1 and loss before and after are reported, "
                  "and nothing is written when top-1 drops by more than --max-drop"),
         arg("--max-drop", type=float, default=0.5,
             help="with --eval: the largest top-1 drop, in points, that is still written (default 0.5)"),
         arg("--var-floor", type=float, default=0.01,
             help="a channel whose new variance is below this fraction of its old one keeps the fraction times "
                  "the old variance (default 0.01; 0 = off): a channel constant on the new data would otherwise "
                  "get variance 0 and divide old-domain inputs by sqrt(eps)"),
         arg("--json", action="store_true", help="print the report as JSON"),
         DEVICE, OUTPUT)
def cmd_recalibrate(args) -> int:
    """Re-estimate the mean/var of BatchNormalization nodes on new data; scale and B stay (AdaBN).

    exact: BN nodes are recalibrated level by level (one pass per level, each running only the
    part of the graph it needs), so each BN ends up with the statistics of its input in the
    eval-mode model that is written. batch: one pass with each BN normalising with its batch's
    statistics (torch's update_bn convention; depends on --batch-size). Training-mode BN nodes
    become inference-mode nodes. The report lists, per BN, the change of mean and var (max
    |new-old| / max(|old|,|new|)), dead channels and the pass; --json prints it as JSON."""

    from onnxbn.io.model import Model
    from onnxbn.io.save import refuse_overwrite
    from onnxbn.recalibration import RecalibrationRefused, recalibrate_model

    refuse_overwrite(args.output, [args.model, args.data], args.force)
    try:
        model, report = recalibrate_model(Model.open(args.model), mode=args.mode, nodes=args.nodes,
                                          device=args.device, cache_mb=args.cache_mb, prior=args.prior,
                                          var_floor=args.var_floor, eval_data=args.eval_data,
                                          max_drop=args.max_drop, **RECALIBRATE_DATA.options(args))
    except RecalibrationRefused as refused:
        print(json.dumps(refused.report.to_dict(), indent=2) if args.json else refused.report.table())
        log.error("%s", refused)
        return 1
    # Everything that reads the report is computed before the file is written, so a failure leaves no output.
    table = json.dumps(report.to_dict(), indent=2) if args.json else report.table()
    newly_dead = report.newly_dead_channels()
    model.save(args.output, inputs=[args.model, args.data, args.eval_data] if args.eval_data
               else [args.model, args.data], force=args.force)
    print(table)
    log.info("recalibrated %d BatchNormalization nodes (%s, %d passes, %d samples); wrote %s", len(report.bns),
             report.mode, len(report.passes), report.samples, args.output)
    if newly_dead:
        log.warning("%d channel(s) are constant on this data but were not before: their BN variance is now 0, so "
                    "inputs that vary there (e.g. the old domain) are divided by sqrt(eps); the model now belongs "
                    "to the new data", newly_dead)
    return 0


QUANTIZE_DATA = InputData(required=True, data_help="calibration data (image folder or .npz with x)")


@command(arg("model", help="float ONNX model (BatchNormalization is folded first)"), QUANTIZE_DATA,
         arg("--method", choices=["minmax", "percentile", "entropy", "mse"], default="minmax",
             help="activation ranges from onnxbn's histograms (default: minmax)"),
         arg("--percentile", type=float, default=99.99, help="with --method percentile (default: 99.99)"),
         arg("--per-tensor", action="store_true", help="one weight scale per tensor (default: per output channel)"),
         arg("--activations", choices=["uint8", "int8"], default="uint8",
             help="activation type: uint8 asymmetric (default) or int8 symmetric"),
         arg("--exclude", metavar="NODE,...", help="node names to keep in float"),
         arg("--recover", default="cle,bias", help="accuracy recovery, comma separated: cle (cross-layer "
             "equalization), bias (bias correction), bn (BN re-estimation), or none (default: cle,bias)"),
         arg("--ranges", help="ranges file of the (BN-folded) model from `onnxbn stats --ranges`: no calibration "
             "pass (not with --recover cle, which changes the activations)"),
         arg("--verify-data", help="check the INT8 model on this data (default: the calibration data)"),
         arg("--min-cosine", type=float, default=0.99, help="gate: cosine similarity of each output (default: 0.99)"),
         arg("--min-top1", type=float, default=0.9, help="gate: top-1 agreement of class outputs (default: 0.9)"),
         arg("--json", action="store_true", help="print the report as JSON"), DEVICE, OUTPUT)
def cmd_quantize(args) -> int:
    """Quantize to INT8 (QDQ) with onnxbn's calibration, check it against the float model, write it.

    Per-channel int8 weights and per-tensor activations placed by onnxruntime's quantizer, the
    activation ranges from onnxbn's streaming in-graph histograms. The INT8 model is compared
    with the float one on onnxruntime and written only when every output's cosine similarity
    and top-1 agreement pass the gate (exit 1 otherwise, nothing written)."""
    from onnxbn.io.save import refuse_overwrite, save_model
    from onnxbn.quantization import quantize_with_report

    inputs = [args.model, args.data, args.ranges, args.verify_data]
    refuse_overwrite(args.output, [i for i in inputs if i], args.force)
    model, report = quantize_with_report(
        args.model, method=args.method, percentile=args.percentile, per_channel=not args.per_tensor,
        activations=args.activations, exclude=args.exclude, recover=args.recover, ranges=args.ranges,
        verify_data=args.verify_data, min_cosine=args.min_cosine, min_top1=args.min_top1, device=args.device,
        **QUANTIZE_DATA.options(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    if not report.passed:
        log.error("the INT8 model is further from the float model than the gate allows; nothing written")
        return 1
    save_model(model, args.output, inputs=[i for i in inputs if i], force=args.force)
    log.info("wrote %s", args.output)
    return 0


@command(arg("--out", default="demo-out", help="folder for the report, models and data (default: demo-out)"),
         arg("--epochs", type=int, default=6, help="fine-tuning epochs per variant (default: 6)"),
         arg("--model", help="another single-input classifier ending in a Gemm (default: models/demo_vgg.onnx)"),
         arg("--seed", type=int, default=0, help="seed for data, initialisation and shuffling (default: 0)"))
def cmd_demo(args) -> int:
    """Run the whole procedure on the bundled model and write a report (report.md, report.json, pictures)."""
    from onnxbn.demo.run import run_demo

    report = run_demo(args.out, model=args.model, epochs=args.epochs, seed=args.seed)
    ident, fold = report["identity"], report["fold"]
    print(f"identity BN: max rel error {ident['max_rel_error']:.3g}, top-1 agreement {ident['top1_agreement']:.2%} "
          f"(the notebook's BN: {report['notebook_mistake']['max_rel_error']:.3g})")
    for name, v in report["finetune"].items():
        if v.get("val_loss") is None:  # a diverged run is reported, not hidden
            print(f"fine-tune {name:>12}: diverged (the training loss stopped being finite)")
            continue
        print(f"fine-tune {name:>12}: val loss {v['val_loss_before']:.4f} -> {v['val_loss']:.4f}, "
              f"accuracy {v['val_accuracy_before']:.2%} -> {v['val_accuracy']:.2%}")
    print(f"fold {fold['model']}: {fold['bn_before']} BN -> {fold['bn_remaining']}, "
          f"max rel error {fold['max_rel_error']:.3g}")
    print(f"report: {Path(args.out) / 'report.md'} ({report['seconds']:.0f} s)")
    return 0 if ident["passed"] and fold["passed"] else 1


# ----------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxbn", description=(__doc__ or "").splitlines()[0].rstrip("."),
                                     epilog="Run `onnxbn COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"onnxbn {__import__('onnxbn').__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (fn, arguments) in COMMANDS.items():
        doc = (fn.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        for names, options in arguments:
            p.add_argument(*names, **options)
        p.set_defaults(run=fn)
    return parser


def _crash_report(command: str, exc: BaseException) -> Path:
    """Write the traceback of an unexpected failure to a log file; return its path.

    The file goes to the folder named by the environment variable ONNXBN_LOG_DIR (created when
    missing), else to the system's temporary folder."""
    import platform
    import tempfile
    import time
    import traceback

    from onnxbn import __version__

    folder = os.environ.get("ONNXBN_LOG_DIR") or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"onnxbn-{command}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log",
                                dir=folder)
    with open(fd, "w") as fh:
        fh.write(f"onnxbn {__version__}, Python {platform.python_version()}, {platform.platform()}\n")
        fh.write(f"command line: {' '.join(sys.argv)}\n\n")
        fh.write("".join(traceback.format_exception(exc)))
    return Path(name)


def _refuse_folder_outputs(args) -> None:
    """A UserError when an output-file argument names an existing folder."""
    for attr, flag in OUTPUT_FILES.items():
        path = getattr(args, attr, None)
        if path and os.path.isdir(path):
            raise UserError(f"{path} is a folder; give a file path for {flag}")


def _input_failure(command: str, exc: Exception) -> str | None:
    """The one-line message for a failure that is the input's size, not a bug in onnxbn; else None."""
    if isinstance(exc, MemoryError):
        return f"out of memory while running `{command}`: use a smaller --batch-size / --limit, or more memory"
    if isinstance(exc, ValueError) and "array is too big" in str(exc):
        return ("the model declares a tensor too large to allocate (numpy: array is too big); check the dims of its "
                "initializers and inputs")
    return None


def _runtime_failure(exc: Exception) -> bool:
    """True for onnxruntime failing while it runs a graph: most often the model or the data fed to it,
    though a graph onnxbn added nodes to can fail the same way (so the details still go to a log)."""
    return type(exc).__module__.startswith("onnxruntime") and "while running" in str(exc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("onnxbn: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.propagate = False
    try:
        _refuse_folder_outputs(args)
        with quiet_onnxruntime():
            return args.run(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"onnxbn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxbn: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, or a library failing in a way onnxbn did not foresee
        if args.debug:
            raise
        message = _input_failure(args.command, exc)
        if message:
            print(f"onnxbn: error: {message}", file=sys.stderr)
            return 2
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        path = _crash_report(args.command, exc)
        if _runtime_failure(exc):
            print(f"onnxbn: error: onnxruntime could not run the model: {first[:300]}; no output was written; the "
                  f"details are in {path} (if the model runs in onnxruntime alone, please report them)",
                  file=sys.stderr)
            return 2
        print(f"onnxbn: error: `{args.command}` failed unexpectedly ({type(exc).__name__}: {first}); no output was "
              f"written; the details are in {path}: please report them (or rerun with --debug)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
