"""Command-line plumbing shared by train.py and sample.py: flag values checked with a message that names the flag
(argparse adds the name), and the device choice. bench.py uses the device checks too."""
from __future__ import annotations

import argparse
import math

import torch

from data import DataError


def positive(kind):
    """An argparse type: a number > 0 of `kind` (int or float); nan and inf are refused."""
    def parse(text: str):
        value = kind(text)
        if not value > 0 or value == math.inf:  # nan > 0 is False, so nan is refused too
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def non_negative(kind):
    """An argparse type: a number >= 0 of `kind`; nan and inf are refused."""
    def parse(text: str):
        value = kind(text)
        if not value >= 0 or value == math.inf:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def probability(text: str) -> float:
    """An argparse type: a probability in (0, 1] (top-p)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def probability_or_zero(text: str) -> float:
    """An argparse type: a probability in [0, 1] (dropout rates)."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def native_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls run natively on this device: always on CUDA; on CPUs with AVX-512 BF16 or AMX (oneDNN
    says), where they beat float32. Elsewhere bf16 is emulated, slower than float32."""
    if device_type == "cuda":
        return True
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def pick_device(name: str) -> str:
    """--device auto | cpu | cuda -> the device to use; auto is cuda when there is one."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    return name
