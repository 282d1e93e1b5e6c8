"""
Train codecgpt: encode a folder of notes into EnCodec tokens, then teach the Transformer to predict the next token.

    python train.py                                        # NSynth guitar, pretrained EnCodec (downloads once)
    python train.py --data synthetic --codec untrained     # offline: generated notes, untrained codec
    python train.py --resume                               # continue from out/ckpt.pt
    python train.py --unconditional                        # no pitch/velocity/source tokens, like the reference
    python train.py --pattern delay --bandwidth 6          # 8 codebooks, all predicted in each step (tokenizer.py)
    torchrun --standalone --nproc_per_node=4 train.py      # 4 GPUs on one machine (DistributedDataParallel)

By default every note starts with BOS and its pitch, velocity and source tokens (tokenizer.py), so that sample.py
can ask for a note. Writes out/ckpt.pt (latest), out/best.pt (lowest validation loss), out/log.jsonl (one line
per evaluation) and out/curves.png (the log drawn; `python train.py --plot OUT_DIR` redraws it from any run's log).

Reading order: next_token_loss (the loss) and train (the loop) come first; below them are the helpers the loop
calls: evaluation, checkpoints and exact resume, torchrun, and the flags.
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
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from cli import (add_shared_flags, native_bf16, non_negative, pick_attention, pick_device, positive,
                 probability_or_zero, run_or_exit)
from data import (BANDWIDTH_LEVELS, DEFAULT_FRAMES, FRAME_RATE, Codec, DataError, EncodedFiles, TokenDataset,
                  cache_path, codec_from_checkpoint, encode_files, load_codec_for_training)
from figures import CurvesWriter, curves_from_log
from files import append_log, rewrite_log
from guards import NonFiniteSteps, StopSignals, Stopped, agree
from model import GPT, GPTConfig
from prepare import resolve_data
from tokenizer import PATTERNS, CodecTokenizer


def next_token_loss(model: torch.nn.Module, tokens: Tensor, tokenizer: CodecTokenizer) -> tuple[Tensor, Tensor]:
    """The loss, for training and evaluation alike: the cross-entropy (nats) of every code of tokens (B, [streams,]
    T) given the tokens before it, as (B, levels, frames), and the logits (B, [streams,] T - 1, vocab)."""
    logits = model(tokens[..., :-1])             # the logits at position t score the candidates for token t + 1
    targets = tokens[..., 1:]
    loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)
    return tokenizer.per_code(loss), logits      # only codes count: not BOS, the conditions or the delay's EMPTY


def train(args) -> GPT:
    """Train, as one process or as one rank of a torchrun job; returns the trained model."""
    resumed = checkpoint_to_resume(args)         # None, or the checkpoint whose run continues (its flags win)
    rank, world, device = setup_distributed(pick_device(args.device))
    master = rank == 0                           # the one process that logs and writes checkpoints
    if args.batch_size % (args.grad_accum * world):
        raise DataError(f"--batch-size {args.batch_size} must be a multiple of --grad-accum {args.grad_accum} "
                        f"x {world} processes")
    micro_batch = args.batch_size // (args.grad_accum * world)   # notes per rank and micro-step
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype, autocast = precision(args.dtype, device_type)
    torch.manual_seed(args.seed + rank)  # each rank its own dropout noise (DDP gives all of them rank 0's weights)

    # The data: notes -> codec -> codes (cached on disk) -> one token sequence per note
    codec, tokenizer, train_set, val_set = prepare_data_once(args, device, resumed, rank, world)
    seq_len = train_set.tokens.shape[-1]
    # The model, and AdamW with weight decay on matrices only, not on norm gains and biases (as nanoGPT). Fused
    # (one kernel for all parameters, on CPU too) because the fused kernel can skip a step on the device: the
    # non-finite step guard (guards.py) tells it to when a loss or gradient norm is NaN or infinite.
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, max_seq_len=seq_len - 1, dim=args.dim, depth=args.depth,
                    heads=args.heads, dim_head=args.dim_head, dropout=args.dropout, streams=tokenizer.streams)
    model = GPT(cfg).to(device)
    attention = pick_attention(args.attention, device, training=True)
    model.set_attention(attention)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=True)
    guard = NonFiniteSteps(optimizer, device, advice=f"try a lower --lr (this run: {args.lr:g}) or --dtype float32")
    batches = torch.Generator().manual_seed(args.seed)  # which notes go in each batch, the same on every rank

    out_dir = Path(args.out_dir)
    start_iter, best_val = 0, float("inf")
    # The training loss since the last evaluation, summed on the device over the steps that counted (not skipped)
    train_loss_sum, steps = torch.zeros((), device=device), torch.zeros((), device=device)
    if resumed:
        start_iter, best_val = restore(resumed, out_dir / "ckpt.pt", cfg, model, optimizer, batches, rank, device_type)
        if "interval" in resumed:  # stopped between evaluations: the sums so far count towards the next one
            train_loss_sum += resumed["interval"]["train_loss_sum"].to(device)
            steps += resumed["interval"]["steps"].to(device)
            guard.load_state_dict(resumed["interval"]["guard"])
        if master:
            rewrite_log(out_dir / "log.jsonl", resumed["metrics"])
            print(f"resuming from {out_dir / 'ckpt.pt'} at iteration {start_iter}")
    raw_model = model                            # what is evaluated and saved, without compile's or DDP's wrapper
    model = wrap_for_compile_and_ddp(model, args.compile, world, device)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{len(train_set)} training notes, {len(val_set)} validation notes, {seq_len - 1} steps each "
              f"({codec.kind} codec, {codec.levels} levels, {tokenizer.pattern} pattern); "
              f"model {raw_model.num_params() / 1e6:.2f}M parameters; "
              f"{device}, {dtype}, {attention} attention"
              + (f"; DDP over {dist.get_backend()}: {world} process{'es' if world > 1 else ''} x {args.grad_accum} "
                 f"micro-steps of {micro_batch} notes" if dist.is_initialized() else ""))

    last_metrics = resumed["metrics"] if resumed else None   # the last evaluation: what a checkpoint holds
    last_saved = (out_dir / "ckpt.pt", start_iter) if resumed else None

    def last_good() -> str:
        """Where a diverged run can be continued from (every checkpoint written had finite weights)."""
        if last_saved is None:
            return "no checkpoint was written"
        return f"the last checkpoint with finite weights is {last_saved[0]} (iteration {last_saved[1]})"

    def save(it: int, metrics: dict, path: Path, rng: dict | None = None, interval: dict | None = None) -> None:
        ckpt = {"model": raw_model.state_dict(), "config": asdict(cfg), "tokenizer": tokenizer.state(),
                "codec": codec.identity(), "iter_num": it, "best_val_loss": best_val, "metrics": metrics,
                "args": vars(args)}
        if rng is not None:  # what --resume needs on top: the optimizer and every random stream
            ckpt.update(optimizer=optimizer.state_dict(), rng=rng)
        if interval is not None:  # written between evaluations: what the next evaluation's log line sums
            ckpt["interval"] = interval
        save_checkpoint(ckpt, path)

    def save_at_stop(it: int) -> None:
        """A checkpoint between evaluations, as resumable as theirs: the optimizer, every random stream (gathered
        from every rank), and the sums the next evaluation's log line needs. Its metrics stay those of the last
        evaluation, and so does the log: no line is made up for a step that was not evaluated."""
        rng = random_states(world, device_type, batches)
        guard.check_weights(raw_model.parameters(), it, last_good())
        interval = {"train_loss_sum": torch.tensor(global_mean(train_loss_sum, world)), "steps": steps.cpu(),
                    "guard": guard.state_dict()}
        if master:
            save(it, last_metrics, out_dir / "ckpt.pt", rng, interval)
            print(f"stopped by {stop.name} after step {it}: saved {out_dir / 'ckpt.pt'}; "
                  "to continue, run the same command with --resume", flush=True)
        if world > 1:
            dist.barrier()  # no rank exits before rank 0 has saved: torchrun would stop it mid-write

    curves = CurvesWriter(out_dir)               # out/curves.png, redrawn from the log after evaluations
    bar = tqdm(total=args.max_iters, initial=start_iter, desc="training", unit="step", disable=None if master else True)
    t0 = time.time()
    timed = None                                 # for the time estimate: None, then (step, clock), False once printed
    stop, stopped_at = StopSignals(), None      # SIGTERM, SIGINT, SIGUSR1: finish the step, save, exit
    with stop:
        for it in range(start_iter, args.max_iters + 1):
            # Evaluate and save every --eval-interval steps (not when the checkpoint resumed from holds this one)
            if ((it % args.eval_interval == 0 or it == args.max_iters)
                    and not (last_metrics is not None and last_metrics["iter"] == it)):
                counted = int(steps.item())
                train_loss = global_mean(train_loss_sum / counted, world) if counted else None
                skipped = guard.take_skipped()
                guard.raise_if_diverged(last_good())
                rng = random_states(world, device_type, batches)  # every rank takes part in gathering these
                metrics = None
                if master:
                    metrics = {"iter": it, "train_loss": train_loss, "skipped_steps": skipped,
                               **evaluate(raw_model, val_set.tokens, tokenizer, args.eval_batch_size, device,
                                          autocast),
                               "lr": lr_at(it, args), "elapsed_s": round(time.time() - t0, 2)}
                # rank 0 evaluates; every rank must learn that it failed, or the others would wait for it forever
                if agree(master and not math.isfinite(metrics["val_loss"]), device):
                    guard.check_value("validation loss", metrics["val_loss"] if master else math.nan, it, last_good())
                guard.check_weights(raw_model.parameters(), it, last_good())
                if master:
                    append_log(out_dir / "log.jsonl", metrics)
                    tqdm.write(f"iter {it}: val loss {metrics['val_loss']:.4f} nats/code, "
                               f"{metrics['val_nats_per_frame']:.3f} nats/frame (levels "
                               + ", ".join(f"{x:.3f}" for x in metrics["val_loss_per_level"])
                               + f"), accuracy {metrics['val_accuracy']:.3f}"
                               + (f"; {skipped} non-finite steps skipped" if skipped else ""))
                    if metrics["val_loss"] < best_val:
                        best_val = metrics["val_loss"]
                        save(it, metrics, out_dir / "best.pt")
                    save(it, metrics, out_dir / "ckpt.pt", rng)
                    curves.update(final=it == args.max_iters)  # after the checkpoints: they matter more
                last_metrics, last_saved = metrics, (out_dir / "ckpt.pt", it)
                train_loss_sum.zero_()
                steps.zero_()
                if timed:
                    timed = (it, time.time())    # an evaluation is not a step: time the steps after it
            if it == args.max_iters:
                break

            # One optimizer step. Every rank draws the same global batch (and the same condition dropout), so
            # which notes a step sees does not depend on the number of processes; each rank takes its own slice.
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, args)
            idx = torch.randint(len(train_set), (args.batch_size,), generator=batches)
            notes = tokenizer.drop_conditions(train_set.tokens[idx], args.cond_dropout, batches)
            step_loss = torch.zeros((), device=device)
            for micro, batch in enumerate(notes.view(args.grad_accum, world, micro_batch, *notes.shape[1:])[:, rank]):
                if isinstance(model, DDP):
                    # DDP all-reduces the gradients inside backward(). Before the last micro-step they only add up
                    # locally, so syncing them there would be wasted traffic: sync once per step (as nanoGPT does).
                    model.require_backward_grad_sync = micro == args.grad_accum - 1
                with autocast:
                    loss, _ = next_token_loss(model, batch.to(device, non_blocking=True), tokenizer)
                # / grad_accum: the summed gradients of the micro-steps are then those of the mean loss of the batch
                loss = loss.mean() / args.grad_accum
                loss.backward()
                step_loss += loss.detach()
            grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
            grad_norm = (torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip) if args.grad_clip > 0
                         else torch.nn.utils.get_total_norm(grads))
            counts = guard.check(step_loss, grad_norm, it)   # on the device: no wait for the GPU
            optimizer.step()                                 # which it skips when the step does not count
            optimizer.zero_grad(set_to_none=True)
            train_loss_sum += torch.where(counts > 0, step_loss, 0.0)   # (NaN x 0 would still be NaN)
            steps += counts
            bar.update(1)
            if (it + 1) % 10 == 0:  # .item() waits for the GPU, so not every step
                guard.raise_if_diverged(last_good())
                bar.set_postfix(loss=f"{global_mean(train_loss_sum / steps.clamp(min=1), world):.3f}",
                                skipped=int(guard.skipped.item()))
                if master and timed and it + 1 - timed[0] >= 5:   # the first steps timed: say what the run will cost
                    tqdm.write(time_estimate((time.time() - timed[1]) / (it + 1 - timed[0]), args.max_iters - it - 1))
                    timed = False
            if timed is None:
                timed = (it + 1, time.time())    # (first step timed, clock): the first step warms up, so it is left out
            if stop.agreed(it, device):   # a signal arrived: this step is done, save it and stop
                stopped_at = it + 1
                break
        bar.close()
        if stopped_at is not None:  # (still inside `with stop`: torchrun SIGTERMs the ranks once one has exited)
            save_at_stop(stopped_at)
            raise Stopped(stop.exit_status)
    if master:
        print(f"done: best validation loss {best_val:.4f} nats/code; checkpoints in {out_dir}/")
    return raw_model


# ----------------------------------------------------------------------------------------------------
# Evaluation and the learning rate

@torch.no_grad()
def evaluate(model: GPT, tokens: Tensor, tokenizer: CodecTokenizer, batch_size: int, device: str, autocast) -> dict:
    """next_token_loss over every validation note: the mean (nats per code), the mean of each codec level, their
    sum (nats per frame: the number that compares patterns and bandwidths fairly), and how often the most likely
    code is the right one."""
    model.eval()
    loss_sum = torch.zeros(tokenizer.levels, device=device)
    correct = torch.zeros((), device=device)
    for batch in tokens.split(batch_size):
        batch = batch.to(device)
        with autocast:
            loss, logits = next_token_loss(model, batch, tokenizer)
        loss_sum += loss.sum(dim=(0, 2))
        correct += tokenizer.per_code(logits.argmax(-1) == batch[..., 1:]).sum()
    model.train()
    codes_per_level = len(tokens) * loss.shape[2]
    per_level = (loss_sum / codes_per_level).tolist()
    return {"val_loss": sum(per_level) / len(per_level), "val_loss_per_level": per_level,
            "val_nats_per_frame": sum(per_level), "val_accuracy": correct.item() / (codes_per_level * len(per_level))}


def lr_at(it: int, args) -> float:
    """Linear warmup to --lr, then cosine decay to --min-lr at --lr-decay-iters (default --max-iters)."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    decay_iters = args.lr_decay_iters or args.max_iters
    progress = (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (args.lr - args.min_lr)


def time_estimate(seconds_per_step: float, steps_left: int) -> str:
    """How long the rest of the run will take at the speed of its first steps, so that nobody waits days unawares
    (the reference size runs minutes on a GPU and days on a laptop CPU: README, quick start)."""
    left = seconds_per_step * steps_left
    amount = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.0f} min" if left >= 60 else f"{left:.0f} s"
    return (f"{seconds_per_step:.3g} s per step: about {amount} at this speed for the {steps_left} steps left "
            "(evaluations not included)")


def precision(dtype: str, device_type: str) -> tuple[str, object]:
    """--dtype -> (its name, the autocast context for the forward pass). auto = bf16 autocast on CUDA and on CPUs
    with native bf16 matmuls (emulated bf16 is slower than float32), float32 elsewhere. TF32 on for CUDA."""
    if dtype == "auto":
        dtype = "bfloat16" if native_bf16(device_type) else "float32"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dtype, torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


# ----------------------------------------------------------------------------------------------------
# Checkpoints and exact resume: after --resume the run goes on as if it had never stopped

# Flags that define the data and the model: on --resume they come from the checkpoint.
RUN_FLAGS = ("data", "data_dir", "synthetic_notes", "codec", "bandwidth", "seconds",
             "dim", "depth", "heads", "dim_head", "dropout", "unconditional", "cond_dropout", "pattern")
OLDER_RUN_FLAGS = {"pattern": "flatten"}  # flags added later: a checkpoint without them had these values


def checkpoint_to_resume(args) -> dict | None:
    """With --resume, OUT_DIR/ckpt.pt, checked to hold all that resuming needs; its run flags replace args'."""
    if not args.resume:
        return None
    path = Path(args.out_dir) / "ckpt.pt"
    resumed = load_checkpoint(path)
    missing = [k for k in ("args", "config", "model", "optimizer", "codec", "iter_num", "best_val_loss",
                           "metrics", "rng") if k not in resumed]
    saved = resumed["args"] if isinstance(resumed.get("args"), dict) else {}
    if "args" not in missing:
        missing += [f"args.{name}" for name in RUN_FLAGS if name not in saved and name not in OLDER_RUN_FLAGS]
    if missing:
        raise CheckpointError(f"{path}: cannot resume from it, it has no {', '.join(missing)}")
    for name in RUN_FLAGS:  # the run is defined by the checkpoint, not by this call's flags
        setattr(args, name, saved.get(name, OLDER_RUN_FLAGS.get(name)))
    return resumed


def random_states(world: int, device_type: str, batches: torch.Generator) -> dict:
    """Every random stream the run draws from: the batch generator (shared by all ranks) and each rank's own torch
    (and CUDA) state, which drives dropout. Gathered from all ranks, so every rank must call this."""
    rng = {"torch": torch.get_rng_state()}
    if device_type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    ranks = [rng]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, rng)
    return {**ranks[0], "batches": batches.get_state(), **({"ranks": ranks} if world > 1 else {})}


def restore_random_states(rng: dict, rank: int, device_type: str, batches: torch.Generator) -> None:
    """Put back what random_states saved (train_codec.py shares it): the batch generator, and this rank's torch (and
    CUDA) state; ranks beyond those saved (resuming on more processes) keep their fresh seed."""
    states = rng.get("ranks") or [rng]
    if rank < len(states):
        torch.set_rng_state(states[rank]["torch"])
        if device_type == "cuda" and "cuda" in states[rank]:
            torch.cuda.set_rng_state(states[rank]["cuda"])
    batches.set_state(rng["batches"])


def restore(resumed: dict, path: Path, cfg: GPTConfig, model: GPT, optimizer, batches: torch.Generator,
            rank: int, device_type: str) -> tuple[int, float]:
    """Put the weights, optimizer and random streams back as the checkpoint saved them; returns (iteration, best
    validation loss). A checkpoint for another model, or a damaged one, is a CheckpointError naming the file."""
    saved = model_from_checkpoint(resumed, path)            # its config, and its weights checked to fit it
    if saved.cfg != cfg:
        differ = [f"{k} {v} != {getattr(cfg, k)}" for k, v in asdict(saved.cfg).items() if getattr(cfg, k) != v]
        raise CheckpointError(f"{path}: made for another model or data than this run builds "
                              f"({', '.join(differ)}; checkpoint != this run)")
    try:
        model.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(resumed["optimizer"])
        for group in optimizer.param_groups:  # older checkpoints saved fused=False (CPU): the guard needs fused
            group["fused"], group["foreach"] = True, None
        restore_random_states(resumed["rng"], rank, device_type, batches)
        json.dumps(resumed["metrics"])  # it goes back into the log
        return int(resumed["iter_num"]), float(resumed["best_val_loss"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: {reason})") from None


# ----------------------------------------------------------------------------------------------------
# Data, and several processes (torchrun)

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
    tokenizer = CodecTokenizer(codec.levels, conditions=not args.unconditional, pattern=args.pattern)
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


def report_skipped(name: str, encoded: EncodedFiles, show: int = 20) -> None:
    """Print how many files were skipped and why (the first `show` of them)."""
    if not encoded.skipped:
        return
    total = len(encoded.skipped) + len(encoded.files)
    print(f"{name}: skipped {len(encoded.skipped)} of {total} files that could not be used:")
    for path, reason in encoded.skipped[:show]:
        print(f"  {path}: {reason}")
    if len(encoded.skipped) > show:
        print(f"  ... and {len(encoded.skipped) - show} more")


def prepare_data_once(args, device: str, resumed: dict | None, rank: int, world: int):
    """prepare_data, with only rank 0 downloading, fitting the codec and encoding into the token cache: the other
    ranks wait for it, take its codec, and then find every note in the cache. On --resume every rank uses the
    checkpoint's codec."""
    codec = codec_from_checkpoint(resumed, Path(args.out_dir) / "ckpt.pt", args.codec_weights) if resumed else None
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


def setup_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this process. torchrun starts one process per GPU (or per CPU worker) on each
    node and tells each who it is in RANK, LOCAL_RANK and WORLD_SIZE; without torchrun this is rank 0 of 1."""
    # Under torchrun the process group is set up even for one process, so that --nproc_per_node=1 runs the same
    # NCCL and DDP code as a larger job: that is how a machine with one GPU tests it.
    if "RANK" not in os.environ:
        return 0, 1, device
    world, rank, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
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


def wrap_for_compile_and_ddp(model: GPT, compile: bool, world: int, device: str) -> torch.nn.Module:
    """torch.compile (--compile), then DistributedDataParallel under torchrun, in that order (as nanoGPT does).
    The unwrapped model is the one saved, so checkpoint keys never carry "_orig_mod." or "module." prefixes."""
    if compile:
        model = torch.compile(model)
    if dist.is_initialized():  # under torchrun, one process too (setup_distributed)
        # DDP gives every rank rank 0's weights, then averages the gradients over the ranks inside backward().
        # The buffers (rotary tables, causal mask) follow from the config, so they need no broadcasting.
        cuda = device.startswith("cuda")
        model = DDP(model, device_ids=[torch.device(device).index] if cuda else None, broadcast_buffers=False)
    return model


def global_mean(x: Tensor, world: int) -> float:
    """x averaged over the ranks: the loss of the whole batch, not of this rank's slice of it."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x.item()


# ----------------------------------------------------------------------------------------------------
# Flags

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
    d.add_argument("--codec", default="pretrained",
                   help="pretrained: EnCodec 24 kHz weights (downloaded once); untrained: same network, random "
                        "weights, codebooks fitted to the data, for offline runs; or PATH: a codec file of "
                        "train_codec.py (OUT_DIR/codec.pt), carried into the checkpoint (default: pretrained)")
    d.add_argument("--bandwidth", type=float, default=1.5, choices=sorted(BANDWIDTH_LEVELS),
                   help="EnCodec bandwidth in kbps: 1.5, 3, 6, 12 or 24 = 2, 4, 8, 16 or 32 codebooks (default: 1.5)")
    d.add_argument("--pattern", choices=PATTERNS, default="flatten",
                   help="how the codebooks are laid out in steps (tokenizer.py): flatten (one code per step, the "
                        "reference's), delay (all codebooks each step, codebook k k steps late) or parallel (all "
                        "codebooks each step) (default: flatten)")
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
    t.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="bfloat16 = bf16 autocast; auto = bfloat16 on CUDA and on CPUs with native bf16 "
                        "(AVX-512 BF16 / AMX), float32 otherwise (default: auto)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model for training (worth it on CUDA; on a CPU it was slower here)")
    add_shared_flags(t, attention_auto="fused on CUDA, fast on CPU")
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation, batches and dropout (default: 0)")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/ckpt.pt exactly where it stopped; the data, codec and model flags "
                        "are taken from the checkpoint")
    t.add_argument("--plot", metavar="OUT_DIR", default=None,
                   help="only redraw OUT_DIR/curves.png (losses, loss per codec level, learning rate) from "
                        "OUT_DIR/log.jsonl, of a run finished, running or killed, and exit")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot is not None:
        try:
            print(f"wrote {curves_from_log(args.plot)}")
        except (OSError, ValueError) as e:
            sys.exit(f"error: --plot: {e}")
        return
    try:
        run_or_exit(lambda: train(args))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("interrupted; the last checkpoint is in place, continue with --resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
