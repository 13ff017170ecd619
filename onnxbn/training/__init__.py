"""Fine-tuning an ONNX model in torch on cached features, and evaluation through onnxruntime.

The notebook's trick: everything up to the last convolution block is frozen, so it
runs once over the data and its outputs go to a memory-mapped feature cache; the
epochs then train only the rest (the dense layers and their new BN) on those
features. The model is cut after the freeze node (`split_model`): the frozen prefix runs in
onnxruntime on the ONNX graph itself (any operator onnxruntime runs), and only the suffix is
imported with `to_torch`, trained with Adam (by default) on cross-entropy, and its trained
tensors written back into the original ONNX graph, which is then checked through onnxruntime
against the prefix in onnxruntime + the torch suffix in eval mode (<= 1e-5 relative, else it fails).

One job per module: `split` (where the model is cut), `cache` (the feature cache), `outputs` (how
the output is read: probabilities, log-probabilities or logits), `loop` (the epochs), `gate` (write-back
and its check), `tuning` (`finetune`, `finetune_model`, `finetune_to_file`), `evaluation` (`evaluate`).
"""

from onnxbn.training.cache import Features, cached_features
from onnxbn.training.evaluation import evaluate
from onnxbn.training.gate import WriteBackProbe
from onnxbn.training.outputs import are_probabilities, output_kind
from onnxbn.training.split import default_freeze_node, split_model
from onnxbn.training.tuning import FinetuneReport, FinetuneResult, finetune, finetune_model, finetune_to_file

__all__ = ["Features", "FinetuneReport", "FinetuneResult", "WriteBackProbe", "are_probabilities", "cached_features",
           "default_freeze_node", "evaluate", "finetune", "finetune_model", "finetune_to_file", "output_kind",
           "split_model"]
