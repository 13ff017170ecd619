"""Profiles (full, quick, tiny), the models they name, and the Context the benchmarks share.

Models: the full profile uses VGG16 at 224x224 with random weights (`onnxbn.export_vgg`,
written once to the work folder and reused). quick uses a VGG11-shaped network with a quarter
of the channels at 64x64 (built here in torch and exported with the same TorchScript exporter);
tiny a two-conv miniature at 16x16.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- profiles

@dataclass(frozen=True)
class Profile:
    """Model and sizes of one run (full, quick or tiny)."""

    name: str
    description: str
    arch: str                  # "vgg16" through export_vgg, else a config in CONFIGS below
    image_size: int
    width_div: int = 1
    hidden: int = 4096
    classes: int = 1000
    batch: int = 8             # stats / inference batch
    stats_batches: int = 4     # batches per stats-cost run
    mem_images: int = 8        # N of stats-memory (and 4N)
    mem_selector: str = "relu"
    train_batch: int = 4
    train_steps: int = 2       # steps per contender per repetition
    cache_samples: int = 64
    cache_batch: int = 16
    pipeline_images: int = 64
    jpeg_size: tuple[int, int] = (500, 375)
    latency_runs: dict = field(default_factory=lambda: {1: 8, 8: 3})
    reps: int = 3


CONFIGS: dict[str, list] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "tiny": [8, "M", 16, "M"],
}

PROFILES = {
    "full": Profile("full", "VGG16 (onnxbn.export_vgg, random weights), 224x224", "vgg16", 224, stats_batches=4,
                    mem_images=16, cache_samples=64, cache_batch=64, pipeline_images=64,
                    latency_runs={1: 5, 8: 2}, reps=2),
    "quick": Profile("quick", "VGG11-shaped, channels/4, 64x64, 256-unit dense layers (quick)", "vgg11", 64,
                     width_div=4, hidden=256, classes=100, batch=4, stats_batches=3, mem_images=8,
                     train_batch=4, train_steps=2, cache_samples=32, cache_batch=8, pipeline_images=32, jpeg_size=(160, 120),
                     latency_runs={1: 10, 8: 5}, reps=3),
    "tiny": Profile("tiny", "2-conv miniature, 16x16 (smoke test)", "tiny", 16, hidden=32, classes=10, batch=4,
                    stats_batches=2, mem_images=4, train_batch=4, train_steps=1, cache_samples=8, cache_batch=4,
                    pipeline_images=8, jpeg_size=(40, 30), latency_runs={1: 3, 8: 2}, reps=1),
}


# ----------------------------------------------------------------------------- torch VGG (hand-written)

def torch_vgg(profile: Profile, bn: bool = False, dropout: float = 0.0, seed: int = 0):
    """A plain torch VGG for `profile`: nn.Sequential features and classifier.

    With `bn`, BatchNorm2d follows every conv and BatchNorm1d every hidden Linear (BN after
    every linear layer, what the `linear` selector gives). VGG16 at 224 keeps torchvision's
    7x7 adaptive average pool; smaller inputs flatten the last feature map directly.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    layers, channels, size = [], 3, profile.image_size
    for item in CONFIGS[profile.arch]:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
            size //= 2
            continue
        out = int(item) // profile.width_div
        layers.append(nn.Conv2d(channels, out, 3, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        channels = out
    head = []
    if profile.image_size % 224 == 0:
        head.append(nn.AdaptiveAvgPool2d((7, 7)))
        size = 7
    head.append(nn.Flatten(1))
    dense = []
    features = channels * size * size
    for _ in range(2):
        dense.append(nn.Linear(features, profile.hidden))
        if bn:
            dense.append(nn.BatchNorm1d(profile.hidden))
        dense.append(nn.ReLU(inplace=True))
        if dropout:
            dense.append(nn.Dropout(dropout))
        features = profile.hidden
    dense.append(nn.Linear(features, profile.classes))
    model = nn.Sequential(nn.Sequential(*layers), nn.Sequential(*head), nn.Sequential(*dense))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                assert m.bias is not None  # every conv above has a bias
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)  # distinct: no shared initializers
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.in_features) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
    return model


def export_small(profile: Profile):
    """ONNX of `torch_vgg(profile)` (no BN, eval mode) through torch's TorchScript exporter."""
    import io
    import warnings

    import onnx
    import torch

    model = torch_vgg(profile).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, profile.image_size, profile.image_size),),
                          # torch annotates `f` as a path; its TorchScript exporter also writes to a file object
                          buffer,  # pyright: ignore[reportArgumentType]
                          dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())



def write_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`n` seeded smooth-noise JPEGs in two class sub-folders (ImageNet layout)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    done = folder / ".done"
    if done.is_file() and done.read_text() == f"{n} {size}":
        return folder
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        img.save(sub / f"img{i:05d}.jpg", quality=90)
    done.write_text(f"{n} {size}")
    return folder


def expose(model, names: list[str]):
    """A copy of `model` with `names` added as graph outputs (what calibrators do)."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in have)
    return out


def numpy_moments(t: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count per channel, mean, M2) of an (N, C, ...) array, reduced in numpy (float64)."""
    axes = tuple(i for i in range(t.ndim) if i != 1)
    count = t.size // t.shape[1]
    mean = t.mean(axis=axes, dtype=np.float64)
    var = t.var(axis=axes, dtype=np.float64)
    return count, mean, var * count


def quiet_session(model):
    """A CPU session whose intra-op threads block instead of spinning when idle.

    Used where several sessions alternate run by run: a spinning thread pool of the
    previous session would otherwise steal the cores of the next one. Same options for
    every contender.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- context

class Context:
    """Models, stats and data shared by the benchmarks, built once per run (and cached on disk)."""

    def __init__(self, profile: Profile, workdir: Path, reps: int):
        self.profile = profile
        self.workdir = workdir
        self.reps = reps
        workdir.mkdir(parents=True, exist_ok=True)
        self._cache: dict = {}

    @property
    def model_path(self) -> Path:
        p = self.profile
        path = self.workdir / f"{p.name}-{p.arch}-{p.image_size}.onnx"
        if not path.is_file():
            from onnxbn.io.save import save_model

            print(f"building {p.description} -> {path}", file=sys.stderr, flush=True)
            if p.name == "full":
                import onnxbn

                model = onnxbn.export_vgg(p.arch, image_size=p.image_size)
            else:
                model = export_small(p)
            save_model(model, path, force=True)
        return path

    @property
    def model(self):
        if "model" not in self._cache:
            from onnxbn.io.load import load_model

            self._cache["model"] = load_model(self.model_path)
        return self._cache["model"]

    def arrays(self, n: int, seed: int = 0) -> np.ndarray:
        s = self.profile.image_size
        return np.random.default_rng(seed).standard_normal((n, 3, s, s)).astype(np.float32)

    def stats_path(self, selector: str) -> Path:
        path = self.workdir / f"{self.model_path.stem}.{selector}.stats.npz"
        if not path.is_file():
            import onnxbn

            x = self.arrays(2 * self.profile.batch, seed=1)
            onnxbn.collect_stats(self.model, x, after=selector, batch_size=self.profile.batch,
                                 device="cpu").save(path, force=True)
        return path

    def bn_model(self, selector: str):
        key = f"bn-{selector}"
        if key not in self._cache:
            import onnxbn

            self._cache[key] = onnxbn.insert_bn(self.model, self.stats_path(selector))
        return self._cache[key]

    def session(self, model):
        from onnxbn.runtimes.ort_backend import make_session

        return make_session(model, "cpu")

    def input_name(self) -> str:
        from onnxbn.feeding import model_input

        return model_input(self.model)[0]
