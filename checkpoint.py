"""
Files that must survive a crash, and checkpoints that must not be trusted blindly.

- atomic_write: every file codecgpt writes for later runs (checkpoints, the token cache, the rewritten training
  log, the fitted untrained codec) goes to a temporary file in the same folder, is flushed to disk and renamed over
  the old one, so a reader sees the old file or the new one, never part of one, even after a kill.
- save_checkpoint / load_checkpoint: torch.save plus a SHA-256 digest of everything saved, because torch checks
  no checksum of tensor data: without the digest a byte flipped on disk loads silently as a wrong weight. Loading
  always uses weights_only=True (a checkpoint can hold tensors and plain values only, never code to run), checks
  the digest when there is one (checkpoints from before it have none and still load), and turns every problem
  into a CheckpointError of one line naming the file.
- model_from_checkpoint, tokenizer_from_checkpoint, codec_from_checkpoint: what train.py saved, rebuilt.
- gpt_from_x_transformers: the reference notebook's x-transformers weights, mapped into our GPT.
"""
from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, IO

import torch
from torch import Tensor

from model import GPT, GPTConfig
from tokenizer import CodecTokenizer


class CheckpointError(Exception):
    """A checkpoint that cannot be used, reported as one line naming the file."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call write(f) on a temporary file beside path, flush it to disk, then rename it to path."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # one per process: two writers never share a file
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (a crash right after it could otherwise undo it)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:  # some file systems cannot fsync a folder; the rename has happened either way
        pass


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


def codec_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint", weights: str | None = None):
    """The data.Codec a checkpoint was trained with (the pretrained one needs its weights: downloaded, or
    `weights`)."""
    from data import Codec  # imported here: data.py writes its files with atomic_write from this module
    try:
        return Codec.from_identity(ckpt["codec"], weights)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path}: its codec cannot be rebuilt ({type(e).__name__}: {e})") from None


def load_for_sampling(path: str | Path, codec_weights: str | None = None):
    """(model, tokenizer, codec) from a checkpoint of train.py, checked to fit together."""
    ckpt = load_checkpoint(path)
    if "codec" not in ckpt or "tokenizer" not in ckpt:
        raise CheckpointError(f"{path}: not a codecgpt checkpoint (no codec or tokenizer); "
                              "for the reference notebook's weights use --xt-checkpoint")
    model = model_from_checkpoint(ckpt, path)
    tokenizer = tokenizer_from_checkpoint(ckpt, path)
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(f"{path}: its tokenizer ({tokenizer.vocab_size} tokens) does not fit its model "
                              f"({model.cfg.vocab_size} tokens)")
    codec = codec_from_checkpoint(ckpt, path, codec_weights)
    if codec.levels != tokenizer.levels:
        raise CheckpointError(f"{path}: its codec has {codec.levels} levels, its tokenizer {tokenizer.levels}")
    return model, tokenizer, codec


# ----------------------------------------------------------------------------------------------------
# The reference recipe's checkpoint: an x-transformers state dict

def gpt_from_x_transformers(state_dict: dict[str, Tensor], heads: int, dim_head: int = 64,
                            max_seq_len: int = 250) -> GPT:
    """Build a GPT from a state dict of x-transformers' TransformerWrapper(attn_layers=Decoder(
    rotary_pos_emb=True)) (or of an AutoregressiveWrapper around one) and copy every weight.

    heads and dim_head cannot be told apart from the weights (to_q is (heads * dim_head, dim)), so they are
    given. Raises ValueError naming what does not map when the state dict has anything else.
    """
    sd = {k.removeprefix("net."): v for k, v in state_dict.items()}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in sd:
            raise ValueError(f"x-transformers state dict has no {key!r}: not a rotary Decoder we can map")
        used.add(key)
        return sd[key]

    vocab_size, dim = take("token_emb.emb.weight").shape
    depth = 0
    while f"attn_layers.layers.{2 * depth}.1.to_q.weight" in sd:
        depth += 1
    if depth == 0:
        raise ValueError("x-transformers state dict has no attention layers (attn_layers.layers.0.1.to_q.weight)")
    inner = sd["attn_layers.layers.0.1.to_q.weight"].shape[0]
    if inner != heads * dim_head:
        raise ValueError(f"to_q has {inner} outputs but heads * dim_head = {heads} * {dim_head}")
    if "attn_layers.rotary_pos_emb.inv_freq" not in sd:
        raise ValueError("x-transformers state dict has no rotary_pos_emb: only rotary decoders map to GPT")
    inv_freq = take("attn_layers.rotary_pos_emb.inv_freq")
    rotary_dim = 2 * inv_freq.numel()
    expected = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    if not torch.allclose(inv_freq.float().cpu(), expected):
        raise ValueError("rotary inv_freq is not base 10000 (xpos / rescaled rotary are not supported)")

    cfg = GPTConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, dim=dim, depth=depth, heads=heads,
                    dim_head=dim_head, rotary_dim=rotary_dim, dropout=0.0)
    model = GPT(cfg)
    new = {"embed.weight": take("token_emb.emb.weight"),
           "norm.weight": take("attn_layers.final_norm.gamma") + 1,  # x-transformers stores gain - 1
           "head.weight": take("to_logits.weight")}
    for i in range(depth):
        a, f, b = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}", f"blocks.{i}"
        new[f"{b}.norm1.weight"] = take(f"{a}.0.0.gamma") + 1
        new[f"{b}.attn.qkv.weight"] = torch.cat([take(f"{a}.1.to_{n}.weight") for n in "qkv"])
        # With one head and dim == dim_head, x-transformers has no to_out (Identity).
        new[f"{b}.attn.out.weight"] = (take(f"{a}.1.to_out.weight") if f"{a}.1.to_out.weight" in sd
                                       else torch.eye(dim))
        new[f"{b}.norm2.weight"] = take(f"{f}.0.0.gamma") + 1
        for ours, theirs in (("up", "ff.0.0"), ("down", "ff.2")):
            new[f"{b}.mlp.{ours}.weight"] = take(f"{f}.1.{theirs}.weight")
            new[f"{b}.mlp.{ours}.bias"] = take(f"{f}.1.{theirs}.bias")
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"x-transformers state dict has weights GPT cannot map: {', '.join(unused[:8])}"
                         + (" ..." if len(unused) > 8 else ""))
    try:
        model.load_state_dict(new, strict=True)
    except RuntimeError as e:  # shape mismatch, e.g. an MLP that is not 4x wide
        raise ValueError(f"x-transformers weights do not fit GPT({cfg}): {e}") from None
    return model
