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

Reading order: the settings, next_token_loss (the loss) and train (the loop) come first; below them are what the loop
calls: evaluation, the learning rate, the data, and the flags. What a long run needs around the loop (checkpoints and
exact resume, signals, non-finite steps, torchrun, the log) is long_run.py's.
"""
from __future__ import annotations

import argparse
import math
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import save_checkpoint
from cli import (add_shared_flags, native_bf16, non_negative, pick_attention, pick_device, positive,
                 probability_or_zero, train_or_exit)
from codec_kinds import codec_from_checkpoint, load_codec
from data import (BANDWIDTH_LEVELS, DEFAULT_FRAMES, FRAME_RATE, HOP, DataError, TokenDataset, cache_path, encode_files,
                  first_notes, report_skipped, usable_splits)
from figures import curves_from_log
from long_run import LongRun, checkpoint_to_resume
from model import GPT, GPTConfig
from prepare import resolve_data
from tokenizer import PATTERNS, CodecTokenizer


@dataclass
class Settings:
    """Every flag's default: the reference recipe (`python train.py --help` says what each flag does)."""
    # data
    data: str = "nsynth-guitar"          # nsynth-guitar (downloaded once), synthetic, or a folder of audio files
    data_dir: str = "data"               # downloads, synthetic notes and caches
    cache_dir: str | None = None         # the token cache (None: DATA_DIR/cache)
    synthetic_notes: int = 300
    codec: str = "pretrained"            # pretrained (EnCodec), untrained, or a codec file of train_codec.py
    bandwidth: float = 1.5               # kbps: 2 codebooks
    pattern: str = "flatten"             # how the codebooks are laid out in steps (tokenizer.py)
    seconds: float = DEFAULT_FRAMES / FRAME_RATE   # of each note, from its start
    # model
    dim: int = 256
    depth: int = 6
    heads: int = 4
    dim_head: int = 64
    dropout: float = 0.1
    unconditional: bool = False          # no pitch, velocity and source tokens
    cond_dropout: float = 0.1            # how often a condition is "unknown" in training (for sample.py --cfg)
    # training
    out_dir: str = "out"
    max_iters: int = 20000
    batch_size: int = 64                 # notes per step, over all processes and micro-steps
    grad_accum: int = 1                  # micro-steps per step
    lr: float = 6e-4                     # warmup to lr, then a cosine decay to min_lr at lr_decay_iters
    min_lr: float = 6e-5
    warmup_iters: int = 500
    lr_decay_iters: int | None = None    # None: max_iters
    weight_decay: float = 0.1
    grad_clip: float = 1.0               # 0: no clipping
    eval_interval: int = 500
    eval_batch_size: int = 128
    dtype: str = "auto"                  # bf16 autocast where bf16 is native, else float32
    compile: bool = False
    device: str = "auto"
    attention: str = "auto"
    codec_weights: str | None = None     # a local file of the pretrained EnCodec weights
    seed: int = 0
    resume: bool = False
    plot: str | None = None


# Flags that define the data and the model: on --resume they come from the checkpoint
RUN_FLAGS = ("data", "data_dir", "synthetic_notes", "codec", "bandwidth", "seconds",
             "dim", "depth", "heads", "dim_head", "dropout", "unconditional", "cond_dropout", "pattern")


def next_token_loss(model: torch.nn.Module, tokens: Tensor, tokenizer: CodecTokenizer) -> tuple[Tensor, Tensor]:
    """The loss, for training and evaluation alike: the cross-entropy (nats) of every code of tokens (B, [streams,]
    T) given the tokens before it, as (B, levels, frames), and the logits (B, [streams,] T - 1, vocab)."""
    logits = model(tokens[..., :-1])             # the logits at position t score the candidates for token t + 1
    targets = tokens[..., 1:]
    loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)
    return tokenizer.per_code(loss), logits      # only codes count: not BOS, the conditions or the delay's EMPTY


def train(args: Settings) -> GPT:
    """Train, as one process or as one rank of a torchrun job; returns the trained model."""
    resumed = checkpoint_to_resume(args, RUN_FLAGS, ("config", "codec", "best_val_loss"), "train.py")
    run = LongRun(args.out_dir, args.max_iters, args.eval_interval, pick_device(args.device), resumed,
                  advice=f"try a lower --lr (this run: {args.lr:g}) or --dtype float32")
    device = run.device
    micro_batch = micro_batch_size(args, run.world)   # notes per rank and micro-step
    dtype, autocast = precision(args.dtype, device)
    torch.manual_seed(args.seed + run.rank)  # each rank its own dropout noise (DDP gives all of them rank 0's weights)

    # The data: notes -> codec -> codes (cached on disk) -> one token sequence per note
    codec, tokenizer, train_set, val_set = prepare_data_once(args, run, resumed)
    seq_len = train_set.tokens.shape[-1]
    # The model, and AdamW with weight decay on matrices only, not on norm gains and biases (as nanoGPT). Fused: its
    # kernel can skip a step on the device, which run.skip_if_not_finite asks of it for a non-finite loss.
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, max_seq_len=seq_len - 1, dim=args.dim, depth=args.depth,
                    heads=args.heads, dim_head=args.dim_head, dropout=args.dropout, streams=tokenizer.streams)
    model = GPT(cfg).to(device)
    attention = pick_attention(args.attention, device, training=True)
    model.set_attention(attention)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=True)
    batches = torch.Generator().manual_seed(args.seed)  # which notes go in each batch, the same on every rank
    run.start(model, optimizer, batches, asdict(cfg))   # on --resume: the weights, optimizer, random streams, log
    best_val = float(resumed["best_val_loss"]) if resumed else math.inf
    raw_model = model                      # what is evaluated and saved, without compile's or DDP's wrapper
    model = run.wrap(model, args.compile, broadcast_buffers=False)   # (its buffers follow from the config)
    if run.master:
        print(f"{len(train_set)} training notes, {len(val_set)} validation notes, {seq_len - 1} steps each "
              f"({codec.kind} codec, {codec.levels} levels, {tokenizer.pattern} pattern); "
              f"model {raw_model.num_params() / 1e6:.2f}M parameters; {device}, {dtype}, {attention} attention"
              + (f"; {run.ddp} x {args.grad_accum} micro-steps of {micro_batch} notes" if run.ddp else ""))

    def checkpoint(it: int, metrics: dict | None) -> dict:  # best.pt; ckpt.pt adds the optimizer and random states
        return {"model": raw_model.state_dict(), "config": asdict(cfg), "tokenizer": tokenizer.state(),
                "codec": codec.identity(), "iter_num": it, "best_val_loss": best_val, "metrics": metrics,
                "args": asdict(args)}

    with run:
        for it in range(run.start_iter, args.max_iters + 1):
            if run.should_evaluate(it):  # every --eval-interval steps, and at the end
                metrics = run.evaluate(it, lambda: evaluate(raw_model, val_set.tokens, tokenizer, args.eval_batch_size,
                                                            device, autocast), lr=lr_at(it, args))
                if run.master:
                    tqdm.write(evaluation_line(metrics))
                    if metrics["val_loss"] < best_val:
                        best_val = metrics["val_loss"]
                        save_checkpoint(checkpoint(it, metrics), run.out_dir / "best.pt")
                run.save(it, checkpoint(it, metrics))
            if it == args.max_iters:
                break

            # One optimizer step. Every rank draws the same global batch (and the same condition dropout), so which
            # notes a step sees does not depend on the number of processes; each rank takes its own slice.
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, args)
            idx = torch.randint(len(train_set), (args.batch_size,), generator=batches)
            notes = tokenizer.drop_conditions(train_set.tokens[idx], args.cond_dropout, batches)
            step_loss = torch.zeros((), device=device)
            for micro, batch in enumerate(notes.view(args.grad_accum, run.world, micro_batch,
                                                     *notes.shape[1:])[:, run.rank]):
                if isinstance(model, DDP):  # gradients add up locally; DDP averages them in the last backward only
                    model.require_backward_grad_sync = micro == args.grad_accum - 1
                with autocast:
                    loss, _ = next_token_loss(model, batch.to(device, non_blocking=True), tokenizer)
                # / grad_accum: the summed gradients of the micro-steps are then those of the mean loss of the batch
                loss = loss.mean() / args.grad_accum
                loss.backward()
                step_loss += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or math.inf)
            run.skip_if_not_finite(step_loss, grad_norm, it)   # NaN or infinite: the fused step changes nothing
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if run.step_done(it, step_loss):                   # a signal came: save this step, exit 128 + N
                run.stop(it + 1, checkpoint(it + 1, run.last_metrics))
    if run.master:
        print(f"done: best validation loss {best_val:.4f} nats/code; checkpoints in {run.out_dir}/")
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


def evaluation_line(m: dict) -> str:
    return (f"iter {m['iter']}: val loss {m['val_loss']:.4f} nats/code, {m['val_nats_per_frame']:.3f} nats/frame "
            f"(levels {', '.join(f'{x:.3f}' for x in m['val_loss_per_level'])}), accuracy {m['val_accuracy']:.3f}"
            + (f"; {m['skipped_steps']} non-finite steps skipped" if m["skipped_steps"] else ""))


def micro_batch_size(args: Settings, world: int) -> int:
    """Notes per process and micro-step: --batch-size split over --grad-accum micro-steps and the processes."""
    if args.batch_size % (args.grad_accum * world):
        raise DataError(f"--batch-size {args.batch_size} must be a multiple of --grad-accum {args.grad_accum} "
                        f"x {world} processes")
    return args.batch_size // (args.grad_accum * world)


def lr_at(it: int, args: Settings) -> float:
    """Linear warmup to --lr, then cosine decay to --min-lr at --lr-decay-iters (default --max-iters)."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    decay_iters = args.lr_decay_iters or args.max_iters
    progress = (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (args.lr - args.min_lr)


def precision(dtype: str, device: str) -> tuple[str, object]:
    """--dtype -> (its name, the autocast context for the forward pass). auto = bf16 autocast on CUDA and on CPUs
    with native bf16 matmuls (emulated bf16 is slower than float32), float32 elsewhere. TF32 on for CUDA."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if native_bf16(device_type) else "float32"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dtype, torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


# ----------------------------------------------------------------------------------------------------
# The data

def prepare_data(args: Settings, device: str, codec=None, verbose: bool = True):
    """Files -> codec -> cached codes -> token datasets (data.py). On --resume the checkpoint's codec is passed in."""
    files = resolve_data(args.data, args.data_dir, args.synthetic_notes, args.seed)
    frames = round(args.seconds * FRAME_RATE)
    cache_dir = args.cache_dir or str(Path(args.data_dir) / "cache")
    if codec is None:
        try:  # (an untrained codec is fitted to the first training notes)
            codec = load_codec(args.codec, args.bandwidth, args.codec_weights, cache_dir=cache_dir, seed=args.seed,
                               fit_on=lambda: first_notes(files["train"], frames * HOP), device=device)
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
    train_notes, valid_notes = usable_splits(encoded["train"], encoded["valid"], args.data, verbose)
    return codec, tokenizer, TokenDataset(train_notes, tokenizer), TokenDataset(valid_notes, tokenizer)


def prepare_data_once(args: Settings, run: LongRun, resumed: dict | None):
    """prepare_data on rank 0 first (downloads, fitting the codec, encoding into the token cache); the other ranks
    then take rank 0's codec and find every note in the cache. On --resume every rank uses the checkpoint's codec."""
    codec = codec_from_checkpoint(resumed, run.out_dir / "ckpt.pt", args.codec_weights) if resumed else None
    prepared = run.on_rank_zero_first(lambda: prepare_data(args, run.device, codec))
    if run.world == 1:
        return prepared
    # rank 0's codec, not one fitted here: every rank must turn audio into the same tokens
    identity = run.broadcast(prepared[0].identity() if run.master else None)
    if run.master:
        return prepared
    return prepare_data(args, run.device, codec or load_codec(identity, weights=args.codec_weights), verbose=False)


# ----------------------------------------------------------------------------------------------------
# Flags

def parse_args(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data",
                   help="nsynth-guitar (the reference set, downloaded once into --data-dir), synthetic "
                        "(generated plucked strings, no network), or a folder of .wav/.flac/.mp3/.ogg files "
                        "(subfolders named *train*/*valid* are the splits, else 5%% of files by name are validation)"
                        " (default: %(default)s)")
    d.add_argument("--data-dir", help="where downloads, synthetic notes and caches go (default: %(default)s)")
    d.add_argument("--cache-dir", help="token cache folder (default: DATA_DIR/cache)")
    d.add_argument("--synthetic-notes", type=positive(int),
                   help="number of notes for --data synthetic (default: %(default)s)")
    d.add_argument("--codec",
                   help="pretrained: EnCodec 24 kHz weights (downloaded once); untrained: same network, random "
                        "weights, codebooks fitted to the data, for offline runs; or PATH: a codec file of "
                        "train_codec.py (OUT_DIR/codec.pt), carried into the checkpoint (default: %(default)s)")
    d.add_argument("--bandwidth", type=float, choices=sorted(BANDWIDTH_LEVELS),
                   help="EnCodec bandwidth in kbps: 1.5, 3, 6, 12 or 24 = 2, 4, 8, 16 or 32 codebooks "
                        "(default: %(default)s)")
    d.add_argument("--pattern", choices=PATTERNS,
                   help="how the codebooks are laid out in steps (tokenizer.py): flatten (one code per step, the "
                        "reference's), delay (all codebooks each step, codebook k k steps late) or parallel (all "
                        "codebooks each step) (default: %(default)s)")
    d.add_argument("--seconds", type=positive(float),
                   help="seconds of each note to learn, from its start (default: %(default).3f = 125 frames, "
                        "the reference)")
    m = p.add_argument_group("model (the reference size by default)")
    m.add_argument("--dim", type=positive(int), help="model width (default: %(default)s)")
    m.add_argument("--depth", type=positive(int), help="number of blocks (default: %(default)s)")
    m.add_argument("--heads", type=positive(int), help="attention heads (default: %(default)s)")
    m.add_argument("--dim-head", type=positive(int), help="width of each head (default: %(default)s)")
    m.add_argument("--dropout", type=probability_or_zero,
                   help="dropout probability on embeddings, attention weights and the MLP (default: %(default)s)")
    m.add_argument("--unconditional", action="store_true",
                   help="no condition tokens, like the reference recipe (default: pitch, velocity and instrument "
                        "source tokens after BOS, from NSynth-style names or examples.json, unknown where unlabelled)")
    m.add_argument("--cond-dropout", type=probability_or_zero,
                   help="probability that each condition is replaced by 'unknown' in a training sequence, so the "
                        "model also learns unconditional generation (for sample.py --cfg) (default: %(default)s)")
    t = p.add_argument_group("training")
    t.add_argument("--out-dir", help="checkpoints and log (default: %(default)s)")
    t.add_argument("--max-iters", type=positive(int), help="optimizer steps (default: %(default)s)")
    t.add_argument("--batch-size", type=positive(int),
                   help="notes per optimizer step, over all processes and micro-steps together (default: %(default)s)")
    t.add_argument("--grad-accum", type=positive(int),
                   help="split each step into K micro-steps whose gradients add up (less memory, same result); "
                        "--batch-size must be a multiple of K x the number of processes (default: %(default)s)")
    t.add_argument("--lr", type=positive(float), help="peak learning rate (default: %(default)s)")
    t.add_argument("--min-lr", type=non_negative(float),
                   help="learning rate at the end of the cosine decay (default: %(default)s)")
    t.add_argument("--warmup-iters", type=non_negative(int), help="linear warmup steps (default: %(default)s)")
    t.add_argument("--lr-decay-iters", type=positive(int),
                   help="step at which the cosine decay reaches --min-lr (default: --max-iters)")
    t.add_argument("--weight-decay", type=non_negative(float),
                   help="AdamW weight decay on matrices (default: %(default)s)")
    t.add_argument("--grad-clip", type=non_negative(float), help="max gradient norm, 0 = off (default: %(default)s)")
    t.add_argument("--eval-interval", type=positive(int),
                   help="evaluate and save a checkpoint every N steps (default: %(default)s)")
    t.add_argument("--eval-batch-size", type=positive(int), help="notes per evaluation batch (default: %(default)s)")
    t.add_argument("--dtype", choices=("auto", "float32", "bfloat16"),
                   help="bfloat16 = bf16 autocast; auto = bfloat16 on CUDA and on CPUs with native bf16 "
                        "(AVX-512 BF16 / AMX), float32 otherwise (default: %(default)s)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model for training (worth it on CUDA; on a CPU it was slower here)")
    add_shared_flags(t, attention_auto="fused on CUDA, fast on CPU")
    t.add_argument("--seed", type=int, help="seed for initialisation, batches and dropout (default: %(default)s)")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/ckpt.pt exactly where it stopped; the data, codec and model flags "
                        "are taken from the checkpoint")
    t.add_argument("--plot", metavar="OUT_DIR",
                   help="only redraw OUT_DIR/curves.png (losses, loss per codec level, learning rate) from "
                        "OUT_DIR/log.jsonl, of a run finished, running or killed, and exit")
    p.set_defaults(**asdict(Settings()))
    return Settings(**vars(p.parse_args(argv)))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot is not None:
        try:
            print(f"wrote {curves_from_log(args.plot)}")
        except (OSError, ValueError) as e:
            sys.exit(f"error: --plot: {e}")
        return
    train_or_exit(lambda: train(args))


if __name__ == "__main__":
    main()
