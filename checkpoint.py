"""
Checkpoints that must not be trusted blindly.

- save_checkpoint / load_checkpoint: torch.save plus a SHA-256 digest of everything saved, because torch checks
  no checksum of tensor data: without the digest a byte flipped on disk loads silently as a wrong weight. Loading
  always uses weights_only=True (a checkpoint can hold tensors and plain values only, never code to run), checks
  the digest when there is one (checkpoints from before it have none and still load), and turns every problem
  into a CheckpointError of one line naming the file. Written with files.atomic_write, as every file is.
- upgraded: a checkpoint of an older version in today's form, the one place that knows older checkpoints.
- model_from_checkpoint, tokenizer_from_checkpoint: the model and tokenizer train.py saved, rebuilt (its codec:
  codec_kinds.codec_from_checkpoint; all three, checked to fit, for sampling: sample.load_model).
"""
from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from files import atomic_write
from model import GPT, GPTConfig
from tokenizer import CodecTokenizer


class CheckpointError(Exception):
    """A checkpoint that cannot be used, reported as one line naming the file."""


# ----------------------------------------------------------------------------------------------------
# Saving and loading

def digest(obj) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, and every plain value, in a
    fixed order. The same contents give the same digest after a save and a load."""
    h = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, Tensor):
            h.update(f"tensor {x.dtype} {tuple(x.shape)};".encode())
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"dict {len(x)};".encode())
            for key in sorted(x, key=repr):
                feed(key)
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__} {len(x)};".encode())
            for item in x:
                feed(item)
        else:
            h.update(f"{type(x).__name__} {x!r};".encode())

    feed(obj)
    return h.hexdigest()


def save_checkpoint(ckpt: dict, path: str | Path) -> None:
    """torch.save(ckpt) atomically, with the digest of its contents under "digest"."""
    ckpt = {**ckpt, "digest": digest(ckpt)}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True, the digest checked when the file has one. Any problem becomes a
    CheckpointError naming the file."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # truncated, not a torch file, or holding objects that weights_only refuses
        raise CheckpointError(f"{path}: {why_unloadable(path, e)}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(ckpt).__name__}, expected a dict)")
    if "digest" in ckpt:
        saved = ckpt.pop("digest")
        if saved != digest(ckpt):
            raise CheckpointError(f"{path}: damaged: its contents no longer match the SHA-256 digest saved with "
                                  "them (bytes changed on disk after it was written)")
    return ckpt


def upgraded(ckpt: dict) -> dict:
    """A checkpoint of an older version in today's form, for --resume (docs/training.md says which versions)."""
    if "tokenizer" in ckpt and isinstance(ckpt.get("args"), dict):  # train.py's, from before --pattern
        ckpt["args"].setdefault("pattern", "flatten")
    if "config" in ckpt and isinstance(ckpt.get("args"), dict):     # train_codec.py's, from before --pitch-shift
        ckpt["args"].setdefault("pitch_shift", 0)
    optimizer = ckpt.get("optimizer")  # saved before the non-finite step guard, which needs a fused step
    for group in optimizer.get("param_groups", []) if isinstance(optimizer, dict) else []:
        if isinstance(group, dict):
            group.update(fused=True, foreach=None)
    interval = ckpt.get("interval")  # train_codec.py's first stop checkpoints
    if isinstance(interval, dict) and "loss_sum" in interval:
        interval["train_loss_sum"] = interval.pop("loss_sum")
    return ckpt


def why_unloadable(path: str | Path, e: Exception) -> str:
    """torch.load's errors in a few words (its own messages are long, and one suggests weights_only=False)."""
    refused = re.search(r"GLOBAL (\S+)", str(e))
    if refused:
        return (f"refused: it holds a pickled object ({refused[1]}), and a checkpoint may hold only tensors and "
                "plain values")
    if isinstance(e, (IsADirectoryError, PermissionError)):
        return f"cannot read it ({e.strerror})"
    try:
        size, is_zip = os.path.getsize(path), zipfile.is_zipfile(path)
    except OSError as again:  # a symlink loop, a file that vanished meanwhile
        return f"cannot read it ({again.strerror})"
    if size == 0:
        return "empty file (0 bytes)"
    if not is_zip:  # torch.save writes a zip archive, whose index is at the end
        return f"truncated or not a PyTorch checkpoint ({size} bytes, no complete zip archive)"
    first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split("\n")[0]
    return f"not a loadable checkpoint ({first_line or type(e).__name__})"


# ----------------------------------------------------------------------------------------------------
# What a checkpoint of train.py holds, rebuilt

def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> GPT:
    """The GPT saved by train.py (config + weights)."""
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: model does not match its config ({str(e).splitlines()[0]})") from None
    return model


def tokenizer_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> CodecTokenizer:
    try:
        return CodecTokenizer(**ckpt["tokenizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its tokenizer entry is unusable ({e})") from None
