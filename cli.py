"""Command-line plumbing shared by the programs: flag values checked with a message that names the flag (argparse adds
the name), the flags train.py and sample.py both take (--device, --attention, --codec-weights) and how their defaults
are resolved, and the one-line exit for a user's mistake (run_or_exit; train_or_exit for the trainers)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist

from checkpoint import CheckpointError
from files import DataError, WriteError
from long_run import Diverged, Stopped
from model import ATTENTION_KINDS
from tokenizer import MIDI_VALUES, NSYNTH_SOURCES


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


def midi_numbers(what: str, example: str, example_range: str):
    """An argparse type for --pitch and --velocity: '60', '60,64,67' or '48-72' (inclusive) -> MIDI numbers, each in
    0..127, in the order given; a number given twice is made once (--num-samples asks for several takes)."""
    def parse(text: str) -> list[int]:
        try:
            values = []
            for part in text.split(","):
                low, _, high = part.strip().partition("-")
                values += list(range(int(low), int(high) + 1)) if high else [int(low)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a MIDI {what}, a list like {example} or a range like "
                                             f"{example_range}, got {text!r}") from None
        bad = [v for v in values if not 0 <= v < MIDI_VALUES]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"MIDI {what} values are 0..127, got {text!r}")
        return list(dict.fromkeys(values))
    return parse


pitches = midi_numbers("pitch", "60,64,67", "48-72")
velocities = midi_numbers("velocity", "25,75,127", "25-127")


def sources(text: str) -> list[str]:
    """An argparse type for --source: 'acoustic' or a list 'acoustic,electronic', each an NSynth instrument source,
    in the order given, each once."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",")))
    bad = [name for name in names if name not in NSYNTH_SOURCES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected {', '.join(NSYNTH_SOURCES)} or a list of them like "
                                         f"acoustic,electronic, got {text!r}")
    return names


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


# ----------------------------------------------------------------------------------------------------
# Flags both programs take

def add_shared_flags(group, attention_auto: str) -> None:
    """--device, --attention and --codec-weights, with the same names, checks and help in train.py and sample.py;
    attention_auto says what --attention auto means for that program (pick_attention)."""
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto = cuda when available (default: auto)")
    group.add_argument("--attention", choices=("auto", *ATTENTION_KINDS), default="auto",
                       help="explicit (the textbook formula), fast (the same, in fewer passes with a cheaper dropout "
                            "mask on CPU) or fused (scaled_dot_product_attention, flash on CUDA); auto = "
                            f"{attention_auto} (default: auto)")
    group.add_argument("--codec-weights", default=None,
                       help="a local encodec_24khz-d7cc33bc.th, for the pretrained codec, instead of downloading it")


def pick_attention(name: str, device: str, training: bool) -> str:
    """--attention auto -> the faster path, as measured (bench.py): fused (scaled_dot_product_attention) on CUDA,
    and for sampling on a CPU too (one query row per step); for training on a CPU, fast."""
    if name != "auto":
        return name
    return "fused" if device.startswith("cuda") or not training else "fast"


def pick_weights(name: str, device: str) -> str:
    """--weights: auto -> the fastest format that keeps the notes, as measured (bench.py, docs/speed.md): float32,
    on a CPU too, where the reference size's weights sit in the cache and torch's int8 kernel is no faster than
    float32's (int8 and bfloat16 are for larger models, and GPUs once measured). bfloat16 is refused where it is not
    native: emulated, it is slower."""
    if name == "auto":
        return "float32"
    if name == "bfloat16" and not native_bf16(device.split(":")[0]):
        raise DataError("--weights bfloat16: this CPU has no native bf16 (emulated it is slower than float32); "
                        "use --weights int8 or float32")
    return name


def run_or_exit(program: Callable[[], object]) -> None:
    """Run a program's body; a DataError or CheckpointError (a user's mistake or a damaged file), a Diverged run or a
    WriteError (a full disk) ends it with one line and exit status 1, no traceback; Stopped (a signal, after saving)
    with its own status, 128 + the signal's number. Under torchrun every rank reports its own (it may be the only
    one)."""
    where = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        program()
    except (DataError, CheckpointError, Diverged, WriteError) as e:
        sys.exit(f"error{where}: {e}")
    except Stopped as e:  # by a signal, after saving what there was to save (the program said how to go on)
        sys.exit(e.status)


def train_or_exit(train: Callable[[], object]) -> None:
    """run_or_exit for a trainer: a second Ctrl-C too (exit status 130: the last checkpoint is in place), and under
    torchrun the process group closed at the end."""
    try:
        run_or_exit(train)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("interrupted; the last checkpoint is in place, continue with --resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
