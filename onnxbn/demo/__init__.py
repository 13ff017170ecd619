"""The end-to-end run on the bundled model: the 2017 notebook's procedure, done right, and its claim tested.

models/demo_vgg.onnx (a small VGG trained without BN on the procedural `source`
task, see models/README.md) plays VGG16; the `target` task plays cats vs dogs.
Steps: statistics on source images -> identity BN after the dense layers -> check ->
new 2-way classifier -> a learning-rate sweep, BN vs no-BN, several seeds per
(variant, lr), every fine-tune on one cache of the frozen conv features -> the
notebook's lr and 30x as per-epoch curves -> write back -> fold -> check ->
recalibration on domain-shifted images -> the folded model on every installed runtime.

The notebook's claim: BN after the dense layers lets them be fine-tuned faster and at
higher learning rates. The sweep tests it on a grid fixed up front (log-spaced lrs,
the same budget for every cell); the report's words are computed from its numbers,
whichever way they fall. Nothing is tuned to flatter BN.

Each sweep cell (variant, lr, seed index) is one `onnxbn.finetune` call whose seed is
derived from those three values only (`cell_seed`): a cell gives the same numbers
whichever other cells ran before it. A cell whose training loss stops being finite is
recorded as diverged (kept in every table and the plot, never dropped).

Modules, in the order run.py calls them: data (the procedural tasks), shift, sweep, verdict, recalibration,
quantize, deploy, plots, report, run. Outside the core API: nothing below onnxbn.cli imports this package.
"""
