"""float32 computed as float32 on CUDA while onnxbn's torch work runs.

torch lets cuDNN run float32 convolutions in TF32 by default (10 mantissa bits: errors
around 1e-3 relative, not float32's 6e-8). Statistics measured in torch (batch
recalibration), the fine-tuning that onnxbn writes back into a float32 graph, and the
write-back parity check must mean what the ONNX graph means, as onnxbn's onnxruntime
sessions do (`use_tf32=0`), so these run with cuDNN convolutions and cuBLAS matrix
products in IEEE float32. bf16 autocast (`--bf16`) is unaffected: it asks for bf16.
On a CPU the flags change nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and cuBLAS matrix products inside the block; restored after."""
    import torch

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9: the per-backend API
        matmul = torch.backends.cuda.matmul
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
