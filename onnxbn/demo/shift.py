"""The demo's domain shift ("another camera"), fixed before any run.

For uint8 images scaled to x in [0, 1]: x' = ((x - mean(x)) * contrast + mean(x)) * gain_rgb + brightness, mean over
each whole image; then a k x k box blur (edge padding); then back to uint8 with rounding and clipping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxbn.demo.data import make_task, to_model_input
from onnxbn.io.save import atomic_path

# The demo's domain shift ("another camera"), fixed before any run: contrast x0.6 around each
# image's mean, a warm colour cast, +0.05 brightness, a 3x3 box blur.
SHIFT = {"contrast": 0.6, "gain": (1.10, 0.95, 0.75), "brightness": 0.05, "blur": 3}


def shift_images(images: np.ndarray, shift: dict = SHIFT) -> np.ndarray:
    """The demo's domain shift of uint8 (N,H,W,3) images: lower contrast, a colour cast, brighter, blurred."""
    x = images.astype(np.float32) / np.float32(255.0)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * np.float32(shift["contrast"]) + mean
    x = x * np.asarray(shift["gain"], np.float32) + np.float32(shift["brightness"])
    k = int(shift["blur"])
    if k > 1:
        pad = k // 2
        p = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
        h, w = x.shape[1:3]
        x = sum(p[:, i:i + h, j:j + w] for i in range(k) for j in range(k)) / np.float32(k * k)
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def write_shifted_npz(path: Path, n: int, seed: int, labels: bool = True) -> Path:
    """Shifted target-task images as a .npz (x, and y when `labels`); unlabelled for recalibration."""
    images, y = make_task("target", n, seed)
    x = to_model_input(shift_images(images))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".npz") as tmp, open(tmp, "wb") as f:
        if labels:
            np.savez(f, x=x, y=y)
        else:
            np.savez(f, x=x)
    return path
