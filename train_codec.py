"""
Train the codec (codec.py) on a folder of notes, so that codecgpt needs no pretrained weights.

    python train_codec.py                                   # synthetic notes, the small codec, the CPU recipe
    python train_codec.py --data nsynth-guitar              # the NSynth guitar notes (downloaded once)
    python train_codec.py --data FOLDER --resume            # continue from out-codec/ckpt.pt exactly
    python train_codec.py --size encodec --device cuda      # the published 24 kHz architecture, on a GPU
    torchrun --standalone --nproc_per_node=4 train_codec.py # 4 processes (DistributedDataParallel)

Writes OUT_DIR/codec.pt (the codec file: its config, weights and digest; `data.Codec.load(path, bandwidth)` reads
it and `train.py --codec PATH` trains the language model on its codes), OUT_DIR/ckpt.pt (what --resume needs),
OUT_DIR/log.jsonl (one line per evaluation: per bandwidth SI-SNR, mel distance, codebook perplexity per level,
pitch kept and the attack's level kept on the held-out notes) and OUT_DIR/curves.png.

Each step draws notes, a crop of each (a quarter at the onset, the rest anywhere in the part of the note the
language model learns, --seconds, plus --crop-slack frames) and one
bandwidth for the whole batch (as EnCodec does, so one codec serves 1.5 to 24 kbps). The teacher f0 of a note
(codec.py: it drives the synthesizer in training) is its NSynth-style label when its name or examples.json has one,
else pitch.py's estimate of the file; notes with neither train without it.

Reading order: the loop first, then the data, checkpoints and flags; the loss is codec.codec_loss.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import codec as C
from codec_extras import discriminator_loss, evaluate, generator_losses, make_discriminator
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cli import pick_device, positive, run_or_exit
from data import DataError, EncodedFiles, FRAME_RATE, HOP, load_examples_json, nsynth_labels, read_audio
from figures import CurvesWriter, codec_curves
from files import append_log, rewrite_log
from guards import NonFiniteSteps, StopSignals, Stopped, agree
import pitch
from prepare import resolve_data
from train import global_mean, random_states, report_skipped, restore_random_states, setup_distributed

CODEC_FILE_KIND = "codecgpt-codec"    # what a codec file says it is (data.Codec.load checks it)
ONSET_CROPS = 0.25   # this share of the crops starts at the note's onset: else the pluck is 1 crop start in ~130,
                     # and it came back silent (measured)


def train(args) -> C.CodecModel:
    resumed = checkpoint_to_resume(args)
    rank, world, device = setup_distributed(pick_device(args.device))
    master = rank == 0
    if args.batch_size % world:
        raise DataError(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    torch.manual_seed(args.seed + rank)   # each rank its own noise and dead-code restarts
    notes = load_notes(args, verbose=master)

    # the published architecture has no harmonic synthesizer, so its phases can follow the input: EnCodec's L1 x 0.1
    sized = {"w_l1": 0.1} if args.size == "encodec" else {"width": args.width}
    cfg = C.CodecConfig(**resumed["config"]) if resumed else C.CodecConfig(size=args.size, **sized)
    model = C.make_codec(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)   # fused: the guard can skip a step
    guard = NonFiniteSteps(optimizer, device, advice=f"try a lower --lr (this run: {args.lr:g})")
    disc = disc_optimizer = None
    if args.adversarial:
        disc = make_discriminator().to(device)
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    batches = torch.Generator().manual_seed(args.seed)   # notes, crops and bandwidth of each step: same on all ranks

    out_dir = Path(args.out_dir)
    start_iter = 0
    loss_sum, steps = torch.zeros((), device=device), torch.zeros((), device=device)   # since the last evaluation
    if resumed:
        start_iter = restore(resumed, out_dir / "ckpt.pt", model, optimizer, disc, disc_optimizer, batches, rank,
                             device)
        if "interval" in resumed:  # stopped between evaluations: the sums so far count towards the next one
            loss_sum += resumed["interval"]["loss_sum"].to(device)
            steps += resumed["interval"]["steps"].to(device)
            guard.load_state_dict(resumed["interval"]["guard"])
        if master:
            rewrite_log(out_dir / "log.jsonl", resumed["metrics"])
            print(f"resuming from {out_dir / 'ckpt.pt'} at iteration {start_iter}")
    else:
        # codebooks from k-means on the (random) encoder's latents of up to 64 notes: every rank the same
        model.init_codebooks(notes["train"][:64, :notes["frames"] * HOP].to(device), seed=args.seed)
    raw_model = model
    if dist.is_initialized():
        # the codebooks are buffers updated by EMA in the forward pass: DDP gives every rank rank 0's at each step
        model = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{len(notes['train'])} training notes, {len(notes['valid'])} held-out notes; {cfg.size} codec, "
              f"{raw_model.num_params() / 1e6:.2f}M parameters; {device}"
              + (f"; DDP: {world} processes" if world > 1 else ""))

    last_metrics = resumed["metrics"] if resumed else None   # the last evaluation: what a checkpoint holds
    last_saved = (out_dir / "ckpt.pt", start_iter) if resumed else None

    def last_good() -> str:
        """Where a diverged run can be continued from (every checkpoint written had finite weights)."""
        return (f"the last checkpoint with finite weights is {last_saved[0]} (iteration {last_saved[1]})"
                if last_saved else "no checkpoint was written")

    def save(it: int, metrics: dict, rng: dict, interval: dict | None = None) -> None:
        """ckpt.pt (resumable) and, at evaluations, codec.pt; never with weights or codebooks that are not finite
        (the codebooks are buffers, updated in the forward pass even of a step the guard skips)."""
        guard.check_weights(raw_model.state_dict().values(), it, last_good())
        config = asdict(cfg)
        if interval is None:
            save_checkpoint({"kind": CODEC_FILE_KIND, "config": config, "model": C.inference_state(raw_model),
                             "iter_num": it, "metrics": metrics}, out_dir / "codec.pt")
        ckpt = {"config": config, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "iter_num": it, "metrics": metrics, "args": vars(args), "rng": rng}
        if interval is not None:   # written between evaluations: what the next evaluation's log line sums
            ckpt["interval"] = interval
        if disc is not None:
            ckpt.update(disc=disc.state_dict(), disc_optimizer=disc_optimizer.state_dict())
        save_checkpoint(ckpt, out_dir / "ckpt.pt")

    crop = args.crop_frames * HOP
    micro = args.batch_size // world
    curves = CurvesWriter(out_dir, draw=codec_curves)
    bar = tqdm(total=args.max_iters, initial=start_iter, desc="training codec", unit="step",
               disable=None if master else True)
    t0, train_s = time.time(), float(resumed["metrics"].get("train_s", 0.0)) if resumed else 0.0
    if resumed and "interval" in resumed:
        train_s = float(resumed["interval"]["train_s"])
    stop, stopped_at = StopSignals(), None      # SIGTERM, SIGINT, SIGUSR1: finish the step, save, exit
    with stop:
        for it in range(start_iter, args.max_iters + 1):
            if ((it % args.eval_interval == 0 or it == args.max_iters)
                    and not (last_metrics is not None and last_metrics["iter"] == it)):
                counted = int(steps.item())
                train_loss = global_mean(loss_sum / counted, world) if counted else None
                skipped = guard.take_skipped()
                guard.raise_if_diverged(last_good())
                rng = random_states(world, "cuda" if device.startswith("cuda") else "cpu", batches)
                metrics = None
                if master:
                    metrics = {"iter": it, "train_loss": train_loss, "skipped_steps": skipped, "lr": args.lr,
                               "train_s": round(train_s, 1), "elapsed_s": round(time.time() - t0, 1)}
                    metrics.update(evaluation(raw_model, notes, args))
                if agree(master and not math.isfinite(metrics["val_loss"]), device):
                    guard.check_value("validation loss", metrics["val_loss"] if master else math.nan, it,
                                      last_good())
                if master:
                    append_log(out_dir / "log.jsonl", metrics)
                    tqdm.write(summary_line(metrics))
                    save(it, metrics, rng)
                    curves.update(final=it == args.max_iters)
                last_metrics, last_saved = metrics, (out_dir / "ckpt.pt", it)
                loss_sum.zero_()
                steps.zero_()
            if it == args.max_iters:
                break

            # One step: the same notes, crops and bandwidth on every rank; each rank takes its slice of the notes
            t_step = time.time()
            idx = torch.randint(len(notes["train"]), (args.batch_size,), generator=batches)
            start = torch.randint(notes["frames"] + args.crop_slack - args.crop_frames + 1, (args.batch_size,),
                                  generator=batches) * HOP
            at_onset = torch.rand(args.batch_size, generator=batches) < ONSET_CROPS
            start = torch.where(at_onset, 0, start)
            levels = list(C.BANDWIDTH_LEVELS.values())[int(torch.randint(len(C.BANDWIDTH_LEVELS), (1,),
                                                                         generator=batches))]
            mine = slice(rank * micro, (rank + 1) * micro)
            audio = torch.stack([notes["train"][i, s:s + crop] for i, s in zip(idx[mine].tolist(),
                                                                              start[mine].tolist())]).to(device)
            f0 = notes["train_f0"][idx[mine]].to(device)
            loss, parts, out = C.codec_loss(model, audio, levels, f0)
            if disc is not None:  # --adversarial: the discriminator's step first, then the codec's losses through it
                real = audio[:, :out.audio.shape[-1]]
                disc_optimizer.zero_grad(set_to_none=True)
                discriminator_loss(disc, real, out.audio).backward()
                disc_optimizer.step()
                g_loss, feat = generator_losses(disc, real, out.audio)
                loss = loss + cfg.w_adv * g_loss + cfg.w_feat * feat
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in raw_model.parameters() if p.grad is not None])
            counts = guard.check(loss, grad_norm, it)        # on the device: no wait for the GPU
            optimizer.step()                                 # which it skips when the step does not count
            loss_sum += torch.where(counts > 0, loss.detach(), 0.0)
            steps += counts
            train_s += time.time() - t_step
            bar.update(1)
            if (it + 1) % 10 == 0:
                guard.raise_if_diverged(last_good())
                bar.set_postfix(loss=f"{global_mean(loss_sum / steps.clamp(min=1), world):.3f}",
                                skipped=int(guard.skipped.item()))
            if stop.agreed(it, device):   # a signal arrived: this step is done, save it and stop
                stopped_at = it + 1
                break
        bar.close()
        if stopped_at is not None:  # (still inside `with stop`: torchrun SIGTERMs the ranks once one has exited)
            rng = random_states(world, "cuda" if device.startswith("cuda") else "cpu", batches)
            interval = {"loss_sum": torch.tensor(global_mean(loss_sum, world)), "steps": steps.cpu(),
                        "guard": guard.state_dict(), "train_s": train_s}
            if master:
                save(stopped_at, last_metrics, rng, interval)
                print(f"stopped by {stop.name} after step {stopped_at}: saved {out_dir / 'ckpt.pt'}; "
                      "to continue, run the same command with --resume", flush=True)
            if world > 1:
                dist.barrier()  # no rank exits before rank 0 has saved: torchrun would stop it mid-write
            raise Stopped(stop.exit_status)
    if master:
        print(f"done: the codec is {out_dir / 'codec.pt'}")
    return raw_model


# ----------------------------------------------------------------------------------------------------
# Evaluation

def evaluation(model: C.CodecModel, notes: dict, args) -> dict:
    """codec_extras.evaluate on the held-out notes at --eval-bandwidths, flattened into log.jsonl's keys; the loss at
    the first bandwidth is val_loss (what curves.png draws) and its perplexities val_perplexity_per_level."""
    result = evaluate(model, notes["valid"], notes["valid_f0"], bandwidths=args.eval_bandwidths,
                      measure=None if args.no_pitch_eval else pitch_and_level_kept)
    result.pop("audio")
    first = result[f"bw{float(args.eval_bandwidths[0])}"]
    return {"val_loss": first["loss"], "bandwidths": result}


def pitch_and_level_kept(originals, reconstructions) -> dict:
    """What the codec keeps of the held-out notes (pitch.py): pitch within 50 cents, and the attack's level."""
    return {**pitch.pitch_kept(originals, reconstructions), **pitch.levels_kept(originals, reconstructions)}


def summary_line(m: dict) -> str:
    parts = []
    for bw, r in m["bandwidths"].items():
        kept = "" if "pitch_kept" not in r else (
            f", pitch kept {r['pitch_kept']}/{r['pitch_measured']}, attack level within {r['attack_error_db']:.1f} dB "
            f"(rank corr. {r['attack_rank_correlation']:.2f})")
        ppl = "/".join(f"{p:.0f}" for p in r["perplexity"][:4])
        parts.append(f"{bw[2:]} kbps: SI-SNR {r['si_snr_db']:.1f} dB, mel {r['mel_distance']:.3f}, "
                     f"perplexity {ppl}{'/...' if len(r['perplexity']) > 4 else ''}{kept}")
    train = f"train loss {m['train_loss']:.3f}, " if m["train_loss"] is not None else ""
    return f"iter {m['iter']}: {train}" + "; ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Data: every note read once into memory (a few hundred notes of 2 s are a few tens of MB)

def load_notes(args, verbose: bool = True) -> dict:
    """{'train': (N, samples), 'train_f0': (N,), 'valid': (M, frames * HOP), 'valid_f0': (M,), 'frames'}: the first
    --seconds of each note (training notes a little longer, for the crops), unreadable files skipped with their
    reason. The teacher f0 is NaN where a note has neither a label nor a measurable pitch."""
    files = resolve_data(args.data, args.data_dir, args.synthetic_notes, args.seed)
    frames = round(args.seconds * FRAME_RATE)
    notes = {"frames": frames}
    for name, length in (("train", frames + args.crop_slack), ("valid", frames)):
        audio, used, skipped = [], [], []
        for f in tqdm(files[name], desc=f"reading {name}", unit="file", disable=None if verbose else True):
            try:
                audio.append(read_audio(f, length * HOP))
                used.append(f)
            except DataError as e:
                skipped.append((f, str(e)))
        if verbose:
            report_skipped(name, EncodedFiles(np.zeros((0,)), used, skipped))
        if not audio:
            raise DataError(f"no readable audio in the {name} split of --data {args.data} "
                            f"({len(skipped)} files, all skipped)")
        notes[name] = torch.from_numpy(np.stack(audio))
        notes[f"{name}_f0"] = teacher_f0(used, notes[name])
    return notes


def teacher_f0(files: list[Path], audio: torch.Tensor) -> torch.Tensor:
    """Each note's f0 in Hz: its NSynth label (name or examples.json), else pitch.py's estimate, else NaN."""
    examples = {}
    for folder in sorted({f.parent for f in files}):
        examples.update(load_examples_json(folder) or {})
    f0 = []
    for f, a in zip(files, audio):
        midi = nsynth_labels(f, examples)["pitch"]
        f0.append(pitch.midi_to_hz(midi) if midi >= 0 else pitch.estimate_f0(a.numpy(), C.SAMPLE_RATE))
    return torch.tensor(f0, dtype=torch.float)


# ----------------------------------------------------------------------------------------------------
# Checkpoints and exact resume

RUN_FLAGS = ("data", "data_dir", "synthetic_notes", "seconds", "size", "width", "batch_size", "lr", "crop_frames",
             "crop_slack", "adversarial", "seed")


def checkpoint_to_resume(args) -> dict | None:
    """With --resume, OUT_DIR/ckpt.pt, checked to hold what resuming needs; its run flags replace args'."""
    if not args.resume:
        return None
    path = Path(args.out_dir) / "ckpt.pt"
    resumed = load_checkpoint(path)
    missing = [k for k in ("args", "config", "model", "optimizer", "iter_num", "metrics", "rng") if k not in resumed]
    if missing:
        raise CheckpointError(f"{path}: cannot resume from it, it has no {', '.join(missing)} "
                              "(not a checkpoint of train_codec.py?)")
    for name in RUN_FLAGS:
        if name in resumed["args"]:
            setattr(args, name, resumed["args"][name])
    return resumed


def restore(resumed: dict, path: Path, model, optimizer, disc, disc_optimizer, batches, rank: int, device: str
            ) -> int:
    try:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        for group in optimizer.param_groups:  # a checkpoint saved before the guard: its skip needs fused
            group["fused"], group["foreach"] = True, None
        if disc is not None:
            disc.load_state_dict(resumed["disc"])
            disc_optimizer.load_state_dict(resumed["disc_optimizer"])
        restore_random_states(resumed["rng"], rank, "cuda" if device.startswith("cuda") else "cpu", batches)
        return int(resumed["iter_num"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: {reason})") from None


# ----------------------------------------------------------------------------------------------------
# Flags

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="synthetic",
                   help="synthetic (generated plucked strings, no network), nsynth-guitar (downloaded once into "
                        "--data-dir) or a folder of .wav/.flac/.mp3/.ogg files (as train.py) (default: synthetic)")
    d.add_argument("--data-dir", default="data", help="where downloads and synthetic notes go (default: data)")
    d.add_argument("--synthetic-notes", type=positive(int), default=400,
                   help="number of notes for --data synthetic; every 10th is held out (default: 400: 40 held out)")
    d.add_argument("--seconds", type=positive(float), default=125 / FRAME_RATE,
                   help="seconds of each note, from its start, as train.py learns them (default: 1.667)")
    t = p.add_argument_group("training")
    t.add_argument("--size", choices=("small", "encodec"), default="small",
                   help="small (spectral encoder, harmonic-plus-noise decoder: learns on a CPU) or encodec (the "
                        "published 24 kHz architecture, for GPUs) (default: small)")
    t.add_argument("--width", type=positive(int), default=256,
                   help="channels of the small codec's ConvNeXt blocks (default: 256)")
    t.add_argument("--out-dir", default="out-codec", help="codec file, checkpoint and log (default: out-codec)")
    t.add_argument("--max-iters", type=positive(int), default=1000, help="optimizer steps (default: 1000)")
    t.add_argument("--batch-size", type=positive(int), default=16, help="crops per step (default: 16)")
    t.add_argument("--crop-frames", type=positive(int), default=32,
                   help="frames per training crop (75 per second) (default: 32)")
    t.add_argument("--crop-slack", type=int, default=35,
                   help="crops may reach this many frames past --seconds (default: 35)")
    t.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate (default: 1e-3)")
    t.add_argument("--adversarial", action="store_true",
                   help="add EnCodec's multi-scale STFT discriminator (hinge loss + feature matching)")
    t.add_argument("--eval-interval", type=positive(int), default=250,
                   help="evaluate on the held-out notes and save every N steps (default: 250)")
    t.add_argument("--eval-bandwidths", type=float, nargs="+", default=[1.5, 6.0],
                   choices=sorted(C.BANDWIDTH_LEVELS), help="kbps evaluated (default: 1.5 6)")
    t.add_argument("--no-pitch-eval", action="store_true",
                   help="skip pitch and level kept in evaluations (for tests)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: auto)")
    t.add_argument("--seed", type=int, default=0, help="seed of the notes, initialisation and batches (default: 0)")
    t.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt exactly where it stopped")
    args = p.parse_args(argv)
    if args.crop_frames > round(args.seconds * FRAME_RATE) + args.crop_slack:
        p.error(f"--crop-frames {args.crop_frames} is longer than --seconds plus --crop-slack")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run_or_exit(lambda: train(args))
    except KeyboardInterrupt:
        sys.exit("interrupted; the last checkpoint is in place, continue with --resume")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
