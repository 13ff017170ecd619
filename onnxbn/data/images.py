"""Images to model inputs: decoding, the preprocessing presets, and decoding in worker processes.

Preprocessing presets, at the model's input size S (224 for VGG):
  imagenet      RGB, resize the short side to round(S*256/224), centre crop S, /255,
                subtract mean (0.485, 0.456, 0.406), divide by std (0.229, 0.224, 0.225);
  imagenet-squash  RGB squashed to S x S, then as imagenet (/255, mean, std); for
                models trained on images already at their input size;
  caffe-squash  the 2017 notebook's: RGB squashed to S x S, 0..255, subtract
                (123.68, 116.779, 103.939), channels reversed to BGR.
Images of any mode (L, LA, P, RGBA, CMYK, I;16, ...) are converted to RGB; 16-bit
images are scaled to 8 bits first.

Images are decoded in worker processes (a torch DataLoader) a bounded number of batches
ahead of the consumer, so decoding overlaps inference and memory does not grow with the data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, cast

import numpy as np

from onnxbn.errors import UserError

PRESETS = ("imagenet", "imagenet-squash", "caffe-squash")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CAFFE_MEAN_RGB = np.array([123.68, 116.779, 103.939], dtype=np.float32)


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        scale = 255.0 / (65535.0 if img.mode.startswith("I;16") else max(float(np.asarray(img).max()), 1.0))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) * scale, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess(img, preset: str, size: int) -> np.ndarray:
    """One PIL image -> float32 (3, size, size) under `preset`."""
    from PIL import Image

    img = _to_rgb(img)
    if preset == "imagenet":
        short = round(size * 256 / 224)
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    elif preset == "imagenet-squash":
        img = img.resize((size, size), Image.Resampling.BILINEAR) if img.size != (size, size) else img
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    elif preset == "caffe-squash":
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = (np.asarray(img, dtype=np.float32) - CAFFE_MEAN_RGB)[:, :, ::-1]
    else:
        raise UserError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def decode_batch(paths: Sequence[str], preset: str, size: int) -> tuple[np.ndarray, list[bool], list[str]]:
    """Decode and preprocess `paths`: (images that decoded, ok mask, error messages)."""
    from PIL import Image

    arrays, ok, errors = [], [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                arrays.append(preprocess(img, preset, size))
            ok.append(True)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            ok.append(False)
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
    x = np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.float32)
    return x, ok, errors


class _DecodedChunks:
    """Map-style view of (start, paths) chunks: item i is (start, decode_batch(paths)); what a
    torch DataLoader hands to its workers (a plain class: no torch import without workers)."""

    def __init__(self, chunks, preset, size):
        self.chunks, self.preset, self.size = chunks, preset, size

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i):
        start, paths = self.chunks[i]
        return start, decode_batch(paths, self.preset, self.size)


def _as_is(item):
    return item


def decode_in_order(chunks, preset, size, workers):
    """Decoded chunks in order: in-process, or in `workers` processes through a torch DataLoader
    (forked workers, each two chunks ahead: memory stays flat however large the folder)."""
    items = _DecodedChunks(chunks, preset, size)
    if workers <= 0 or len(chunks) <= 1:
        yield from (items[i] for i in range(len(items)))
        return
    import torch.utils.data as tud

    # a map-style dataset by duck typing: torch's Dataset is a nominal class, and importing torch is avoided above
    yield from tud.DataLoader(cast("tud.Dataset", items), batch_size=None, shuffle=False,
                              num_workers=min(workers, len(chunks)), collate_fn=_as_is, prefetch_factor=2)


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


def list_images(root: Path) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    def images_under(folder: Path, recursive: bool) -> list[str]:
        found = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(str(p) for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                      and not p.name.startswith("."))
    per_class = [(d.name, images_under(d, True)) for d in subdirs]
    per_class = [(name, files) for name, files in per_class if files]
    if per_class:
        classes = [name for name, _ in per_class]
        files = [f for _, fs in per_class for f in fs]
        labels = np.concatenate([np.full(len(fs), i, dtype=np.int64) for i, (_, fs) in enumerate(per_class)])
        return files, labels, classes
    return images_under(root, False), None, None
