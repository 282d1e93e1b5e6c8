"""
Train codecgpt: encode a folder of notes into EnCodec tokens, then teach the Transformer to predict the next token.

    python train.py                                        # NSynth guitar, pretrained EnCodec (downloads once)
    python train.py --data synthetic --codec untrained     # offline: generated notes, untrained codec
    python train.py --resume                               # continue from out/ckpt.pt
    python train.py --unconditional                        # no pitch/velocity/source tokens, like the reference
    torchrun --standalone --nproc_per_node=4 train.py      # 4 GPUs on one machine (DistributedDataParallel)

By default every note starts with BOS and its pitch, velocity and source tokens (see data.CodecTokenizer), so that
sample.py can ask for a note. Writes out/ckpt.pt (latest), out/best.pt (lowest validation loss) and out/log.jsonl
(one line per evaluation).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (DEFAULT_FRAMES, FRAME_RATE, Codec, CodecTokenizer, DataError, EncodedFiles, TokenDataset,
                  cache_path, encode_files, load_codec_for_training, report_skipped, resolve_data)
from model import GPT, CheckpointError, GPTConfig, load_checkpoint

# Flags that define the data and the model: on --resume they come from the checkpoint.
RUN_FLAGS = ("data", "data_dir", "synthetic_notes", "codec", "bandwidth", "seconds",
             "dim", "depth", "heads", "dim_head", "dropout", "unconditional", "cond_dropout")


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0 or value == math.inf:  # nan > 0 is False, so nan is refused too
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def non_negative(kind):
    def parse(text: str):
        value = kind(text)
        if not value >= 0 or value == math.inf:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def probability_or_zero(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="nsynth-guitar",
                   help="nsynth-guitar (the reference set, downloaded once into --data-dir), synthetic "
                        "(generated plucked strings, no network), or a folder of .wav/.flac/.mp3/.ogg files "
                        "(subfolders named *train*/*valid* are the splits, else 5%% of files by name are validation)"
                        " (default: nsynth-guitar)")
    d.add_argument("--data-dir", default="data", help="where downloads, synthetic notes and caches go (default: data)")
    d.add_argument("--cache-dir", default=None, help="token cache folder (default: DATA_DIR/cache)")
    d.add_argument("--synthetic-notes", type=positive(int), default=300,
                   help="number of notes for --data synthetic (default: 300)")
    d.add_argument("--codec", choices=("pretrained", "untrained"), default="pretrained",
                   help="pretrained: EnCodec 24 kHz weights (downloaded once); untrained: same network, random "
                        "weights, codebooks fitted to the data, for offline runs (default: pretrained)")
    d.add_argument("--codec-weights", default=None, help="local encodec_24khz-d7cc33bc.th instead of downloading")
    d.add_argument("--bandwidth", type=float, default=1.5, choices=(1.5, 3.0, 6.0),
                   help="EnCodec bandwidth in kbps: 1.5, 3 or 6 = 2, 4 or 8 codebooks (default: 1.5)")
    d.add_argument("--seconds", type=positive(float), default=DEFAULT_FRAMES / FRAME_RATE,
                   help="seconds of each note to learn, from its start (default: 1.667 = 125 frames, the reference)")
    m = p.add_argument_group("model (the reference size by default)")
    m.add_argument("--dim", type=positive(int), default=256, help="model width (default: 256)")
    m.add_argument("--depth", type=positive(int), default=6, help="number of blocks (default: 6)")
    m.add_argument("--heads", type=positive(int), default=4, help="attention heads (default: 4)")
    m.add_argument("--dim-head", type=positive(int), default=64, help="width of each head (default: 64)")
    m.add_argument("--dropout", type=probability_or_zero, default=0.1,
                   help="dropout probability on embeddings, attention weights and the MLP (default: 0.1)")
    m.add_argument("--unconditional", action="store_true",
                   help="no condition tokens, like the reference recipe (default: pitch, velocity and instrument "
                        "source tokens after BOS, from NSynth-style names or examples.json, unknown where unlabelled)")
    m.add_argument("--cond-dropout", type=probability_or_zero, default=0.1,
                   help="probability that each condition is replaced by 'unknown' in a training sequence, so the "
                        "model also learns unconditional generation (for sample.py --cfg) (default: 0.1)")
    t = p.add_argument_group("training")
    t.add_argument("--out-dir", default="out", help="checkpoints and log (default: out)")
    t.add_argument("--max-iters", type=positive(int), default=20000, help="optimizer steps (default: 20000)")
    t.add_argument("--batch-size", type=positive(int), default=64,
                   help="notes per optimizer step, over all processes and micro-steps together (default: 64)")
    t.add_argument("--grad-accum", type=positive(int), default=1,
                   help="split each step into K micro-steps whose gradients add up (less memory, same result); "
                        "--batch-size must be a multiple of K x the number of processes (default: 1)")
    t.add_argument("--lr", type=positive(float), default=6e-4, help="peak learning rate (default: 6e-4)")
    t.add_argument("--min-lr", type=non_negative(float), default=6e-5,
                   help="learning rate at the end of the cosine decay (default: 6e-5)")
    t.add_argument("--warmup-iters", type=non_negative(int), default=500, help="linear warmup steps (default: 500)")
    t.add_argument("--lr-decay-iters", type=positive(int), default=None,
                   help="step at which the cosine decay reaches --min-lr (default: --max-iters)")
    t.add_argument("--weight-decay", type=non_negative(float), default=0.1,
                   help="AdamW weight decay on matrices (default: 0.1)")
    t.add_argument("--grad-clip", type=non_negative(float), default=1.0, help="max gradient norm, 0 = off (default: 1.0)")
    t.add_argument("--eval-interval", type=positive(int), default=500,
                   help="evaluate and save a checkpoint every N steps (default: 500)")
    t.add_argument("--eval-batch-size", type=positive(int), default=128, help="notes per evaluation batch (default: 128)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda when available (default: auto)")
    t.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="bfloat16 = bf16 autocast; auto = bfloat16 on CUDA and on CPUs with native bf16 "
                        "(AVX-512 BF16 / AMX), float32 otherwise (default: auto)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model for training (worth it on CUDA; on a CPU it was slower here)")
    t.add_argument("--attention", choices=("auto", "explicit", "fused"), default="auto",
                   help="explicit (matmul+softmax) or fused (scaled_dot_product_attention, flash on CUDA); "
                        "auto = fused on CUDA, explicit on CPU (default: auto)")
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation, batches and dropout (default: 0)")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/ckpt.pt exactly where it stopped; the data, codec and model flags "
                        "are taken from the checkpoint")
    return p.parse_args(argv)


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    return name


def cpu_has_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls natively on this CPU (about 2x float32 here; emulated bf16 is slower)."""
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def setup_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this process. torchrun starts one process per GPU (or per CPU worker) on each
    node and tells each who it is in RANK, LOCAL_RANK and WORLD_SIZE; without torchrun this is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            gpus = torch.cuda.device_count()
            raise DataError(f"torchrun started more processes on this node than it has CUDA devices ({gpus}): "
                            f"use --nproc_per_node={gpus} or less")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # NCCL moves the gradients from GPU to GPU; gloo does it between CPU processes
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def lr_at(it: int, args) -> float:
    """Linear warmup to --lr, then cosine decay to --min-lr at --lr-decay-iters (default --max-iters)."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    decay_iters = args.lr_decay_iters or args.max_iters
    progress = (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (args.lr - args.min_lr)


@torch.no_grad()
def evaluate(model: GPT, tokens: torch.Tensor, tokenizer: CodecTokenizer, batch_size: int, device: str,
             autocast) -> dict:
    """Cross-entropy (nats/token), cross-entropy of each codec level, and next-token accuracy over the codes of
    tokens (the BOS and condition tokens are given, never predicted)."""
    model.eval()
    levels, first = tokenizer.levels, tokenizer.prefix - 1   # logits at `first` predict the first code
    loss_sum = torch.zeros(levels, device=device)
    correct = torch.zeros((), device=device)
    for batch in tokens.split(batch_size):
        batch = batch.to(device)
        with autocast:
            logits = model(batch[:, :-1])[:, first:]
        targets = batch[:, first + 1:]
        loss = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, codes)
        # code t of the stream holds level t % levels
        loss_sum += loss.sum(0).view(-1, levels).sum(0)
        correct += (logits.argmax(-1) == targets).sum()
    model.train()
    n = targets.shape[1] * tokens.shape[0]
    per_level = (loss_sum / (n / levels)).tolist()
    return {"val_loss": sum(per_level) / levels, "val_loss_per_level": per_level, "val_accuracy": correct.item() / n}


def save_atomically(obj: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a crash mid-write never replaces a good checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def codec_from_checkpoint(ckpt: dict, path, weights: str | None = None) -> Codec:
    """The codec a checkpoint was trained with; an entry that cannot rebuild one is a CheckpointError naming the
    file."""
    try:
        return Codec.from_identity(ckpt["codec"], weights)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path}: its codec cannot be rebuilt ({type(e).__name__}: {e})") from None


def prepare_data(args, device: str, codec: Codec | None = None, verbose: bool = True):
    """Files -> codec -> cached codes -> token datasets. On --resume the checkpoint's codec is passed in and used."""
    files = resolve_data(args.data, args.data_dir, args.synthetic_notes, args.seed)
    frames = round(args.seconds * FRAME_RATE)
    cache_dir = args.cache_dir or str(Path(args.data_dir) / "cache")
    if codec is None:
        try:
            codec = load_codec_for_training(args.codec, args.bandwidth, args.codec_weights, files["train"], frames,
                                            cache_dir, args.seed, device)
        except DataError as e:
            raise DataError(f"--data {args.data}: {e}") from None
    codec.to(device)
    tokenizer = CodecTokenizer(codec.levels, conditions=not args.unconditional)
    encoded = {}
    for name in ("train", "valid"):
        cache = cache_path(cache_dir, name, files[name], codec, frames)
        encoded[name] = encode_files(files[name], codec, frames, cache, desc=f"encoding {name}")
        if verbose:
            report_skipped(name, encoded[name])
    train_notes, valid_notes = encoded["train"], encoded["valid"]
    if len(train_notes.files) == 0:
        raise DataError(f"no readable audio in the train split of --data {args.data} "
                        f"({len(train_notes.skipped)} files, all skipped)")
    if len(valid_notes.files) == 0:
        # In a small messy folder the one file picked for validation may be the unreadable one: validate on the
        # last readable training note rather than stop.
        if verbose:
            print(f"valid: none of its {len(valid_notes.skipped)} files could be used; "
                  f"validating on {train_notes.files[-1]} instead")
        valid_notes = EncodedFiles(train_notes.codes[-1:], train_notes.files[-1:], valid_notes.skipped)
        if len(train_notes.files) > 1:
            train_notes = EncodedFiles(train_notes.codes[:-1], train_notes.files[:-1], train_notes.skipped)
    return codec, tokenizer, TokenDataset(train_notes, tokenizer), TokenDataset(valid_notes, tokenizer)


def prepare_data_once(args, device: str, codec: Codec | None, rank: int, world: int):
    """prepare_data, with only rank 0 downloading, fitting the codec and encoding into the token cache: the other
    ranks wait for it, take its codec, and then find every note in the cache."""
    if world == 1:
        return prepare_data(args, device, codec)
    # Encoding a large set can outlast NCCL's collective timeout (10 minutes), so the others wait on a CPU (gloo)
    # group with a long timeout of its own.
    waiting = dist.new_group(backend="gloo", timeout=timedelta(hours=6))
    outcome = [None]
    if rank == 0:
        try:
            prepared = prepare_data(args, device, codec)
            outcome = [{"codec": prepared[0].identity()}]
        except DataError as e:
            outcome = [{"error": str(e)}]
    dist.broadcast_object_list(outcome, src=0, group=waiting)  # the barrier, carrying rank 0's codec or error
    if "error" in outcome[0]:
        raise DataError(outcome[0]["error"])
    if rank != 0:
        # rank 0's codec, not one fitted here: every rank must turn audio into the same tokens
        if codec is None:
            codec = Codec.from_identity(outcome[0]["codec"], args.codec_weights)
        prepared = prepare_data(args, device, codec, verbose=False)
    return prepared


def restore(resumed: dict, path: Path, cfg: GPTConfig, model: GPT, optimizer, batches: torch.Generator,
            rank: int, device_type: str) -> tuple[int, float]:
    """Put the weights, optimizer and random streams back as the checkpoint saved them; returns (iteration, best
    validation loss). A checkpoint for another model, or a damaged one, is a CheckpointError naming the file."""
    if resumed["config"] != asdict(cfg):
        saved = resumed["config"] if isinstance(resumed["config"], dict) else {}
        differ = [f"{k} {saved.get(k)} != {v}" for k, v in asdict(cfg).items() if saved.get(k) != v]
        raise CheckpointError(f"{path}: made for another model or data than this run builds "
                              f"({', '.join(differ) or 'unreadable config'}; checkpoint != this run)")
    try:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        # each rank's dropout stream; ranks beyond those saved (resuming on more processes) keep their fresh seed
        states = resumed["rng"].get("ranks") or [resumed["rng"]]
        if rank < len(states):
            torch.set_rng_state(states[rank]["torch"])
            if device_type == "cuda" and "cuda" in states[rank]:
                torch.cuda.set_rng_state(states[rank]["cuda"])
        batches.set_state(resumed["rng"]["batches"])
        json.dumps(resumed["metrics"])  # it goes back into the log
        return int(resumed["iter_num"]), float(resumed["best_val_loss"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: {reason})") from None


def rewrite_log(path: Path, upto: int, last: dict) -> None:
    """Make the log end where the checkpoint we resume from ends: drop evaluations logged after it (the run was
    killed between writing the log and the checkpoint) and lines cut short, and put the checkpoint's own back."""
    kept = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("iter"), int) and entry["iter"] < upto:
                kept.append(line)
    kept.append(json.dumps(last))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def train(args) -> GPT:
    """Train, as one process or as one rank of a torchrun job; returns the trained model."""
    out_dir = Path(args.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    resumed = None
    if args.resume:
        resumed = load_checkpoint(str(ckpt_path))
        missing = [k for k in ("args", "config", "model", "optimizer", "codec", "iter_num", "best_val_loss",
                               "metrics", "rng") if k not in resumed]
        if "args" not in missing:
            saved = resumed["args"] if isinstance(resumed["args"], dict) else {}
            missing += [f"args.{name}" for name in RUN_FLAGS if name not in saved]
        if missing:
            raise CheckpointError(f"{ckpt_path}: cannot resume from it, it has no {', '.join(missing)}")
        for name in RUN_FLAGS:  # the run is defined by the checkpoint, not by this call's flags
            setattr(args, name, resumed["args"][name])
    rank, world, device = setup_distributed(pick_device(args.device))
    master = rank == 0  # the one process that logs and writes checkpoints
    if args.batch_size % (args.grad_accum * world):
        raise DataError(f"--batch-size {args.batch_size} must be a multiple of --grad-accum {args.grad_accum} "
                        f"x {world} processes")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if args.dtype != "auto":
        dtype = args.dtype
    else:
        dtype = "bfloat16" if device_type == "cuda" or cpu_has_bf16() else "float32"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Each rank its own dropout noise. The initial weights need not agree: DDP copies rank 0's to the others.
    torch.manual_seed(args.seed + rank)

    codec = codec_from_checkpoint(resumed, ckpt_path, args.codec_weights) if resumed else None
    codec, tokenizer, train_set, val_set = prepare_data_once(args, device, codec, rank, world)
    seq_len = train_set.tokens.shape[1]
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, max_seq_len=seq_len - 1, dim=args.dim, depth=args.depth,
                    heads=args.heads, dim_head=args.dim_head, dropout=args.dropout)
    model = GPT(cfg).to(device)
    attention = args.attention if args.attention != "auto" else ("fused" if device_type == "cuda" else "explicit")
    model.set_attention(attention)
    # weight decay on matrices only, not on norm gains and biases (as in nanoGPT)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device_type == "cuda")
    batches = torch.Generator().manual_seed(args.seed)  # which notes go in each batch, the same on every rank

    start_iter, best_val = 0, float("inf")
    if resumed:
        start_iter, best_val = restore(resumed, ckpt_path, cfg, model, optimizer, batches, rank, device_type)
        if master:
            rewrite_log(out_dir / "log.jsonl", start_iter, resumed["metrics"])
            print(f"resuming from {ckpt_path} at iteration {start_iter}")

    raw_model = model  # what is evaluated and saved, without DDP's or torch.compile's wrapper
    if args.compile:
        # raw_model is what gets saved, so the checkpoint's keys carry no "_orig_mod." prefix
        model = torch.compile(model)
    if world > 1:
        # DDP gives every rank rank 0's weights, then averages the gradients over the ranks inside backward().
        # The buffers (rotary tables, causal mask) follow from the config, so they need no broadcasting.
        model = DDP(model, device_ids=[torch.device(device).index] if device_type == "cuda" else None,
                    broadcast_buffers=False)
    micro_batch = args.batch_size // (args.grad_accum * world)  # notes per rank and micro-step

    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{len(train_set)} training notes, {len(val_set)} validation notes, {seq_len - 1} tokens each "
              f"({codec.kind} codec, {codec.levels} levels); model {raw_model.num_params() / 1e6:.2f}M parameters; "
              f"{device}, {dtype}, {attention} attention"
              + (f"; {world} processes x {args.grad_accum} micro-steps of {micro_batch} notes" if world > 1 else ""))

    def global_mean(x: torch.Tensor) -> float:
        """x averaged over the ranks: the loss of the whole batch, not of this rank's slice of it."""
        if world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= world
        return x.item()

    def checkpoint(it: int, metrics: dict) -> dict:
        ckpt = {"model": raw_model.state_dict(), "config": asdict(cfg), "tokenizer": tokenizer.state(),
                "codec": codec.identity(), "iter_num": it, "best_val_loss": best_val, "metrics": metrics,
                "args": vars(args)}
        return ckpt

    train_loss_sum, train_loss_count = torch.zeros((), device=device), 0
    t0 = time.time()
    bar = tqdm(total=args.max_iters, initial=start_iter, desc="training", unit="step",
               disable=None if master else True)
    it = start_iter
    while True:
        # (the checkpoint and the log already hold the evaluation of the iteration a run resumes at)
        if (it % args.eval_interval == 0 or it == args.max_iters) and not (resumed and it == start_iter):
            train_loss = global_mean(train_loss_sum / train_loss_count) if train_loss_count else None
            rng = {"torch": torch.get_rng_state()}
            if device_type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state()
            rank_rngs = [rng]
            if world > 1:
                rank_rngs = [None] * world
                dist.all_gather_object(rank_rngs, rng)
            if master:
                metrics = evaluate(raw_model, val_set.tokens, tokenizer, args.eval_batch_size, device, autocast)
                metrics = {"iter": it, "train_loss": train_loss, **metrics, "lr": lr_at(it, args),
                           "elapsed_s": round(time.time() - t0, 2)}
                with open(out_dir / "log.jsonl", "a") as log:
                    log.write(json.dumps(metrics) + "\n")
                tqdm.write(f"iter {it}: val loss {metrics['val_loss']:.4f} (levels "
                           + ", ".join(f"{x:.3f}" for x in metrics["val_loss_per_level"])
                           + f"), accuracy {metrics['val_accuracy']:.3f}")
                if metrics["val_loss"] < best_val:
                    best_val = metrics["val_loss"]
                    save_atomically(checkpoint(it, metrics), out_dir / "best.pt")
                ckpt = checkpoint(it, metrics)
                ckpt["optimizer"] = optimizer.state_dict()
                ckpt["rng"] = {**rng, "batches": batches.get_state()}
                if world > 1:
                    ckpt["rng"]["ranks"] = rank_rngs
                save_atomically(ckpt, ckpt_path)
            train_loss_sum.zero_()
            train_loss_count = 0
        if it >= args.max_iters:
            break

        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, args)
        # Every rank draws the same global batch, so which notes a step sees does not depend on the number of
        # processes; each rank then takes its own slice of every micro-step.
        idx = torch.randint(len(train_set), (args.batch_size,), generator=batches)
        # condition dropout is drawn for the whole batch too, so that every rank agrees on it
        notes = tokenizer.drop_conditions(train_set.tokens[idx], args.cond_dropout, batches)
        for micro, batch in enumerate(notes.view(args.grad_accum, world, micro_batch, -1)[:, rank]):
            batch = batch.to(device, non_blocking=True)
            if world > 1:
                # DDP all-reduces the gradients inside backward(). Before the last micro-step they only add up
                # locally, so syncing them there would be wasted traffic: sync once per step (as nanoGPT does).
                model.require_backward_grad_sync = micro == args.grad_accum - 1
            with autocast:
                logits = model(batch[:, :-1])
            # the condition tokens are inputs, not predictions: only the codes are targets
            targets = batch[:, 1:].clone()
            targets[:, :tokenizer.prefix - 1] = -100   # cross_entropy's ignore_index
            # / grad_accum: the summed gradients of the micro-steps are then those of the mean loss of the batch
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / args.grad_accum
            loss.backward()
            train_loss_sum += loss.detach()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss_count += 1
        it += 1
        bar.update(1)
        if it % 10 == 0:  # .item() waits for the GPU, so not every step
            bar.set_postfix(loss=f"{global_mean(train_loss_sum / train_loss_count):.3f}")
    bar.close()
    if master:
        print(f"done: best validation loss {best_val:.4f} nats/token; checkpoints in {out_dir}/")
    return raw_model


def main(argv=None) -> None:
    args = parse_args(argv)
    # under torchrun every rank reports its own errors (one of them may be the only one that failed)
    where = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        train(args)
    except (DataError, CheckpointError) as e:
        sys.exit(f"error{where}: {e}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted{where}; the last checkpoint is in place, continue with --resume")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
