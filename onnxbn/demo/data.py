"""Procedural image tasks for the bundled demo: no downloads, deterministic, fast.

Two tasks stand in for the 2017 notebook's data:

* ``"source"`` (the ImageNet stand-in): 10 classes of shapes and textures
  (disk, ring, square, triangle, plus, star, bar, crescent, stripes, checker)
  at random position, scale, rotation and colour, over gradient backgrounds
  with random line clutter and pixel noise. The bundled model
  (``models/demo_vgg.onnx``) was trained on it.
* ``"target"`` (the cats-vs-dogs stand-in): 2 classes, ``cat`` (round head with
  two pointed ears) and ``dog`` (round head with two drooping ears), built from
  the same vocabulary (disks, triangles, ellipses) but under a domain shift:
  earthy "fur" colours, textured "grass" backgrounds, smaller figures, more
  clutter, occluding strokes and stronger noise. Features learned on the source
  task transfer, but the dense head has to be retrained, and the task is hard
  enough that a head trained on frozen conv features is well short of 100%.

Images are 32x32 RGB uint8 (small enough that the whole demo trains on 2 CPU
cores in minutes, big enough for three VGG conv blocks: 32 -> 16 -> 8 -> 4).

Every image's random parameters are drawn up front from
``numpy.random.default_rng(seed)`` in a fixed order, then all images of a class
are rendered at once with vectorised numpy, so a call is bit-identical for the
same ``(task, n, seed)`` (on the same platform; transcendental functions may
differ in the last ulp between CPUs, which only matters at a rounding boundary
of the final uint8 quantisation). Use different seeds for train and val splits.

API: :func:`make_task`, :data:`CLASSES`, :func:`to_model_input`,
:func:`write_npz`, :func:`write_image_folder`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypedDict

import numpy as np

__all__ = [
    "CLASSES",
    "IMAGE_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "make_task",
    "to_model_input",
    "write_npz",
    "write_image_folder",
]

IMAGE_SIZE = 32
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

CLASSES: dict[str, list[str]] = {
    "source": [
        "disk",
        "ring",
        "square",
        "triangle",
        "plus",
        "star",
        "bar",
        "crescent",
        "stripes",
        "checker",
    ],
    "target": ["cat", "dog"],
}

_PIX = 2.0 / IMAGE_SIZE  # one pixel in normalised [-1, 1] image coordinates
_c = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) * _PIX - 1.0
_GY, _GX = np.meshgrid(_c, _c, indexing="ij")  # (H, W): y down, x right


class _Difficulty(TypedDict):
    scale: tuple[float, float]
    max_rot: float
    noise: tuple[float, float]
    n_clutter: int
    p_occluder: float


# Target-task difficulty. Tuned so that a fresh dense head trained for ~3 epochs
# (Adam, lr 1e-3, ~2000 images) on the bundled model's frozen conv features is
# clearly short of 100% (see models/README.md for the measured numbers).
_TARGET = _Difficulty(
    scale=(0.55, 0.80),  # figure size: local unit radius, in half-image units
    max_rot=np.pi / 6,  # heads tilt up to +-30 degrees
    noise=(0.02, 0.06),  # pixel noise sigma range (in [0, 1] intensity)
    n_clutter=3,  # background strokes (each present with p=0.8)
    p_occluder=0.2,  # probability of each of 2 strokes drawn over the figure
)


# ----------------------------------------------------------------------------- geometry


def _local(params: dict, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image local coordinates (u, v) in shape units, and the scale (N,1,1)."""
    cx = params["cx"][idx, None, None]
    cy = params["cy"][idx, None, None]
    s = params["scale"][idx, None, None]
    th = params["theta"][idx, None, None]
    dx, dy = _GX[None] - cx, _GY[None] - cy
    ct, st = np.cos(th), np.sin(th)
    u = (dx * ct + dy * st) / s
    v = (-dx * st + dy * ct) / s
    return u.astype(np.float32), v.astype(np.float32), s


def _box(u, v, a, b):
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _polygon(u, v, k: int, r: float, phase: float):
    """Regular k-gon with apothem r (approximate signed distance, exact inside)."""
    d = None
    for i in range(k):
        a = phase + 2.0 * np.pi * i / k
        e = u * np.float32(np.cos(a)) + v * np.float32(np.sin(a)) - r
        d = e if d is None else np.maximum(d, e)
    return d


def _ellipse(u, v, a, b):
    return (np.hypot(u / a, v / b) - 1.0) * min(a, b)


def _source_shape(name: str, u, v):
    """Approximate signed distance (negative inside) of a source-class shape.

    Returns (d, pattern): pattern is None for solid shapes, else a 0/1 field that
    mixes the foreground with the second colour (texture classes).
    """
    r = np.hypot(u, v)
    if name == "disk":
        return r - 1.0, None
    if name == "ring":
        return np.abs(r - 0.75) - 0.25, None
    if name == "square":
        return _box(u, v, 0.8, 0.8), None
    if name == "triangle":
        return _polygon(u, v, 3, 0.5, np.pi / 2), None
    if name == "plus":
        return np.minimum(_box(u, v, 1.0, 0.27), _box(u, v, 0.27, 1.0)), None
    if name == "star":
        phi = np.arctan2(v, u)
        return (r - (0.6 + 0.38 * np.cos(5.0 * phi))) * 0.6, None
    if name == "bar":
        return _box(u, v, 1.05, 0.2), None
    if name == "crescent":
        return np.maximum(r - 1.0, 0.8 - np.hypot(u - 0.5, v)), None
    if name == "stripes":
        return _box(u, v, 0.85, 0.85), (np.sin(u * (2.5 * np.pi)) > 0)
    if name == "checker":
        return _box(u, v, 0.85, 0.85), (np.sin(u * (2.0 * np.pi)) * np.sin(v * (2.0 * np.pi)) > 0)
    raise AssertionError(name)


def _animal(name: str, u, v, ear: np.ndarray):
    """Signed distance of a cat or dog head; ``ear`` (N,1,1) scales the ears."""
    head = np.hypot(u, v - 0.15) - 0.62
    if name == "cat":
        # two upward-pointing triangles at the top of the head
        left, right = (_polygon((u - sx * 0.38) / ear, (v + 0.52) / ear, 3, 0.2, np.pi / 2) * ear
                       for sx in (-1.0, 1.0))
    else:
        # two long ellipses hanging at the sides of the head
        left, right = (_ellipse((u - sx * 0.62) / ear, (v - 0.05) / ear, 0.17, 0.42) * ear for sx in (-1.0, 1.0))
    return np.minimum(head, np.minimum(left, right))


def _coverage(d, s):
    """Anti-aliased coverage from a local-unit distance d and per-image scale s."""
    return np.clip(0.5 - d * s / _PIX, 0.0, 1.0).astype(np.float32)


def _segments(img, p, key: str, idx=None):
    """Composite line segments described by p[key + '_*'] onto img (N,H,W,3) in place."""
    a, b = p[key + "_a"], p[key + "_b"]  # (N,K,2)
    w, col, on = p[key + "_w"], p[key + "_col"], p[key + "_on"]  # (N,K), (N,K,3), (N,K)
    if idx is not None:
        a, b, w, col, on = a[idx], b[idx], w[idx], col[idx], on[idx]
    for k in range(a.shape[1]):
        ax, ay = a[:, k, 0, None, None], a[:, k, 1, None, None]
        bx, by = b[:, k, 0, None, None], b[:, k, 1, None, None]
        ex, ey = bx - ax, by - ay
        t = ((_GX - ax) * ex + (_GY - ay) * ey) / np.maximum(ex * ex + ey * ey, 1e-6)
        t = np.clip(t, 0.0, 1.0)
        d = np.hypot(_GX - ax - t * ex, _GY - ay - t * ey) - w[:, k, None, None]
        alpha = (np.clip(0.5 - d / _PIX, 0.0, 1.0) * on[:, k, None, None])[..., None]
        img *= 1.0 - alpha
        img += alpha * col[:, k, None, None, :]


# ----------------------------------------------------------------------------- parameters


def _segment_params(rng, n: int, k: int, p_on: float, width, palette) -> dict:
    a = rng.uniform(-1.1, 1.1, (n, k, 2)).astype(np.float32)
    ang = rng.uniform(0.0, 2.0 * np.pi, (n, k))
    ln = rng.uniform(0.3, 1.0, (n, k))
    b = (a + np.stack([np.cos(ang) * ln, np.sin(ang) * ln], -1)).astype(np.float32)
    return {
        "_a": a,
        "_b": b,
        "_w": rng.uniform(width[0], width[1], (n, k)).astype(np.float32),
        "_col": palette(rng, (n, k)),
        "_on": (rng.random((n, k)) < p_on).astype(np.float32),
    }


def _bright(rng, shape):
    return rng.random(shape + (3,)).astype(np.float32)


def _earthy(rng, shape):
    """Fur-like colours: browns, greys, black, white, ginger."""
    base = np.array(
        [[0.45, 0.30, 0.18], [0.55, 0.55, 0.55], [0.10, 0.09, 0.08], [0.92, 0.90, 0.86],
         [0.85, 0.50, 0.20], [0.70, 0.60, 0.45], [0.30, 0.22, 0.15]],
        dtype=np.float32,
    )
    pick = rng.integers(0, len(base), shape)
    jitter = rng.normal(0.0, 0.07, shape + (3,)).astype(np.float32)
    return np.clip(base[pick] + jitter, 0.0, 1.0)


def _grass(rng, shape):
    """Background colours for the target task: greens, ochres, slate."""
    base = np.array(
        [[0.30, 0.50, 0.20], [0.55, 0.60, 0.30], [0.60, 0.50, 0.30], [0.35, 0.40, 0.45],
         [0.70, 0.65, 0.50], [0.20, 0.35, 0.25]],
        dtype=np.float32,
    )
    pick = rng.integers(0, len(base), shape)
    jitter = rng.normal(0.0, 0.08, shape + (3,)).astype(np.float32)
    return np.clip(base[pick] + jitter, 0.0, 1.0)


def _contrast(rng, fg, bg_mean, min_diff: float):
    """Push foreground colours away from the background mean so the figure is visible."""
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    diff = (fg - bg_mean) @ luma
    low = np.abs(diff) < min_diff
    if low.any():
        sign = np.where(diff[low] >= 0, 1.0, -1.0).astype(np.float32)
        # invert colours that sit too close to the background brightness
        bgl = (bg_mean[low] @ luma)
        push = np.where(bgl > 0.5, -1.0, 1.0).astype(np.float32)
        sign = np.where(np.abs(diff[low]) < 1e-3, push, sign)
        fg[low] = np.clip(fg[low] + (sign * min_diff * 1.5)[:, None], 0.0, 1.0)
    return fg


def _params(task: str, n: int, rng) -> dict:
    """Every random draw for n images, in a fixed order."""
    k = len(CLASSES[task])
    labels = np.arange(n, dtype=np.int64) % k
    labels = labels[rng.permutation(n)]
    p: dict = {"label": labels}
    if task == "source":
        scale = rng.uniform(0.32, 0.62, n)
        rot = rng.uniform(-np.pi, np.pi, n)
        palette, bgpal = _bright, _bright
        noise = rng.uniform(0.0, 0.06, n)
        n_clutter, p_clutter, p_occ = 3, 0.6, 0.0
    else:
        t = _TARGET
        scale = rng.uniform(t["scale"][0], t["scale"][1], n)
        rot = rng.uniform(-t["max_rot"], t["max_rot"], n)
        palette, bgpal = _earthy, _grass
        noise = rng.uniform(t["noise"][0], t["noise"][1], n)
        n_clutter, p_clutter, p_occ = t["n_clutter"], 0.8, t["p_occluder"]
    margin = 0.98 - scale
    p["scale"] = scale.astype(np.float32)
    p["theta"] = rot.astype(np.float32)
    p["cx"] = (rng.uniform(-1, 1, n) * margin).astype(np.float32)
    p["cy"] = (rng.uniform(-1, 1, n) * margin).astype(np.float32)
    p["noise"] = noise.astype(np.float32)
    # background: two colours, a linear gradient and a low-frequency wave
    p["bg0"] = bgpal(rng, (n,))
    p["bg1"] = np.clip(p["bg0"] + rng.normal(0, 0.2, (n, 3)).astype(np.float32), 0, 1)
    g = rng.uniform(0, 2 * np.pi, n)
    p["grad"] = np.stack([np.cos(g), np.sin(g)], -1).astype(np.float32)
    p["wave_f"] = rng.uniform(1.0, 4.0 if task == "source" else 9.0, (n, 2)).astype(np.float32)
    p["wave_ph"] = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    p["wave_a"] = rng.uniform(0.0, 0.12 if task == "source" else 0.18, n).astype(np.float32)
    bg_mean = 0.5 * (p["bg0"] + p["bg1"])
    p["fg"] = _contrast(rng, palette(rng, (n,)), bg_mean, 0.18)
    p["fg2"] = palette(rng, (n,))  # texture classes / eyes
    p["fg2"] = _contrast(rng, p["fg2"], p["fg"], 0.25)
    p["ear"] = rng.uniform(0.75, 1.3, n).astype(np.float32)
    for key, val in _segment_params(rng, n, n_clutter, p_clutter, (0.015, 0.06), palette).items():
        p["clut" + key] = val
    for key, val in _segment_params(rng, n, 2, p_occ, (0.02, 0.07), bgpal).items():
        p["occ" + key] = val
    p["noise_seed"] = rng.integers(0, 2**63 - 1, dtype=np.int64)
    return p


# ----------------------------------------------------------------------------- rendering


def _render(task: str, p: dict) -> np.ndarray:
    n = p["label"].shape[0]
    H = W = IMAGE_SIZE
    # background
    t = 0.5 + 0.5 * (p["grad"][:, 0, None, None] * _GX + p["grad"][:, 1, None, None] * _GY)
    wave = p["wave_a"][:, None, None] * np.sin(
        np.pi * (p["wave_f"][:, 0, None, None] * _GX + p["wave_f"][:, 1, None, None] * _GY)
        + p["wave_ph"][:, None, None]
    )
    img = p["bg0"][:, None, None, :] + (p["bg1"] - p["bg0"])[:, None, None, :] * t[..., None]
    img = (img + wave[..., None]).astype(np.float32)
    _segments(img, p, "clut")
    # figure, one class at a time
    names = CLASSES[task]
    for c, name in enumerate(names):
        idx = np.flatnonzero(p["label"] == c)
        if idx.size == 0:
            continue
        u, v, s = _local(p, idx)
        fg = p["fg"][idx, None, None, :]
        fg2 = p["fg2"][idx, None, None, :]
        if task == "source":
            d, pattern = _source_shape(name, u, v)
            col = fg if pattern is None else np.where(pattern[..., None], fg, fg2)
            alpha = _coverage(d, s)[..., None]
            img[idx] = img[idx] * (1.0 - alpha) + alpha * col
        else:
            ear = p["ear"][idx, None, None]
            d = _animal(name, u, v, ear)
            alpha = _coverage(d, s)[..., None]
            sub = img[idx] * (1.0 - alpha) + alpha * fg
            # eyes and nose (same for both classes: not a cue by themselves)
            eyes = np.minimum(
                np.minimum(np.hypot(u - 0.24, v - 0.05), np.hypot(u + 0.24, v - 0.05)) - 0.1,
                np.hypot(u, v - 0.38) - 0.09,
            )
            ea = _coverage(eyes, s)[..., None]
            img[idx] = sub * (1.0 - ea) + ea * fg2
    if task == "target":
        _segments(img, p, "occ")
    noise = np.random.default_rng(int(p["noise_seed"])).standard_normal((n, H, W, 3), dtype=np.float32)
    img += noise * p["noise"][:, None, None, None]
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- public API


def make_task(task: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` class-balanced images of ``task`` ("source" or "target").

    Returns ``(images, labels)``: uint8 (N, 32, 32, 3) RGB and int64 (N,). Class
    counts differ by at most one; labels are shuffled. Same arguments give the
    same bytes; use a different ``seed`` for each split.
    """
    if task not in CLASSES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(CLASSES)}")
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0 if task == "source" else 1]))
    p = _params(task, n, rng)
    if n == 0:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), p["label"]
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    chunk = 2048  # bounds memory; chunks use slices of the same pre-drawn parameters
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        sub = {k: (v[lo:hi] if isinstance(v, np.ndarray) and v.ndim and v.shape[0] == n else v)
               for k, v in p.items()}
        sub["noise_seed"] = int(p["noise_seed"]) + lo
        images[lo:hi] = _render(task, sub)
    return images, p["label"]


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N,H,W,3) RGB -> float32 (N,3,H,W): ``(x/255 - mean) / std`` with ImageNet mean/std."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N,H,W,3), got {x.shape}")
    x = x.astype(np.float32) / np.float32(255.0)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _atomic_tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_npz(path, task: str, n: int, seed: int) -> Path:
    """Write ``x`` (preprocessed float32 NCHW) and ``y`` (int64) for ``make_task(task, n, seed)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images, labels = make_task(task, n, seed)
    tmp = _atomic_tmp(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, x=to_model_input(images), y=labels)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_image_folder(root, task: str, n: int, seed: int) -> Path:
    """Write PNGs as ``root/<class>/<index>.png`` (ImageNet layout); returns ``root``.

    Every class gets a folder (even if empty for tiny n); file names are the
    zero-padded image index, so a sorted listing is deterministic.
    """
    from PIL import Image

    root = Path(root)
    images, labels = make_task(task, n, seed)
    names = CLASSES[task]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(max(n - 1, 0))))
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(root / names[int(lab)] / f"{i:0{width}d}.png")
    return root
