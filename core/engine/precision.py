"""Mixed precision: which autocast dtype and whether a gradient scaler, from ``--precision``.

``auto`` picks fp32 on CPU (autocast brings little there and costs accuracy), bf16 on a CUDA device
that supports it, else fp16 with a `torch.amp.GradScaler` (fp16's narrow range underflows small
gradients without one). Explicit choices are honoured on any device autocast supports, so
``--precision bf16`` works on a CPU too.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Literal

import torch

from emofuse.core.errors import ConfigError

PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """The resolved choice: `autocast()` for forward passes, `scaler` (fp16 only) for backward."""

    name: str  # fp32 | bf16 | fp16
    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def cuda_supports_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """Turn ``auto|fp32|bf16|fp16`` into a `Precision` for `device`."""
    device = torch.device(device)
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision: {requested!r} is not one of auto, fp32, bf16, fp16")
    name = requested
    if requested == "auto":
        if device.type == "cuda":
            name = "bf16" if cuda_supports_bf16(device) else "fp16"
        else:
            name = "fp32"
    if name == "bf16" and device.type == "cuda" and not cuda_supports_bf16(device):
        raise ConfigError(f"train.precision: bf16 is not supported on {torch.cuda.get_device_name(device)}",
                          hint="use --precision fp16 or auto")
    dtype = _DTYPES.get(name)
    scaler = None
    if name == "fp16":
        if device.type not in ("cuda", "cpu"):
            raise ConfigError(f"train.precision: fp16 with a gradient scaler needs cuda or cpu, not {device.type}")
        scaler = torch.amp.GradScaler(device.type)
    return Precision(name, device.type, dtype, scaler)
