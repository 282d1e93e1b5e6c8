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
pitch kept and the attack's level kept on the held-out notes) and OUT_DIR/curves.png; at the end, where the set has a
test split (instruments never trained on) or --test-folders are given, OUT_DIR/test.json with the same measures on
them and OUT_DIR/reconstructions/index.html, a few of them beside what the codec gives back.

Each step draws notes, a crop of each (a quarter at the onset, the rest anywhere in the part of the note the
language model learns, --seconds, plus --crop-slack frames) and one bandwidth for the whole batch (as EnCodec does,
so one codec serves 1.5 to 24 kbps). The teacher f0 of a note (codec.py: it drives the synthesizer in training) is
its NSynth-style label when its name or examples.json has one, else pitch.py's estimate of the file; notes with
neither train without it.

Reading order: the settings and the loop first, then the batches, the evaluation, the data and the flags; the loss is
codec.codec_loss, and what a long run needs around the loop is long_run.py's, as for train.py.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import codec as C
import pitch
from checkpoint import save_checkpoint
from cli import pick_device, positive, train_or_exit
from codec_extras import discriminator_loss, evaluate, generator_losses, make_discriminator
from codec_kinds import CODEC_FILE_KIND
from data import FRAME_RATE, HOP, DataError, EncodedFiles, find_audio, labels_of, read_audio, report_skipped
from figures import codec_curves
from files import atomic_write
from long_run import LongRun, checkpoint_to_resume
from prepare import resolve_data

ONSET_CROPS = 0.25   # this share of the crops starts at the note's onset, else the pluck is one crop start in ~130


@dataclass
class Settings:
    """Every flag's default: the CPU recipe (`python train_codec.py --help` says what each flag does)."""
    # data
    data: str = "synthetic"              # synthetic, nsynth-guitar (downloaded once), or a folder of audio files
    data_dir: str = "data"
    synthetic_notes: int = 400           # every 10th is held out
    seconds: float = 125 / FRAME_RATE    # of each note, from its start, as train.py learns them
    # training
    size: str = "small"                  # small (learns on a CPU) or encodec (the published architecture)
    width: int = 256                     # channels of the small codec's ConvNeXt blocks
    out_dir: str = "out-codec"
    max_iters: int = 1000
    batch_size: int = 16                 # crops per step
    crop_frames: int = 32                # 75 frames per second
    crop_slack: int = 35                 # crops may reach this many frames past `seconds`
    pitch_shift: int = 3                 # each crop moved by up to this many semitones up or down, its f0 with it
    lr: float = 1e-3
    adversarial: bool = False            # add EnCodec's multi-scale STFT discriminator
    eval_interval: int = 250
    eval_bandwidths: list[float] = field(default_factory=lambda: [1.5, 6.0])
    eval_notes: int = 50                 # held-out notes evaluated every --eval-interval, spread evenly over the split
                                         # (a watch on the run; the test at the end measures --test-notes)
    test_notes: int = 200                # at the end: this many of the test split's (instruments never trained on)
    test_folders: list[str] = field(default_factory=list)   # at the end: these folders' notes too
    no_pitch_eval: bool = False
    device: str = "auto"
    seed: int = 0
    resume: bool = False


# Flags that define the data, the codec and its training: on --resume they come from the checkpoint
RUN_FLAGS = ("data", "data_dir", "synthetic_notes", "seconds", "size", "width", "batch_size", "lr", "crop_frames",
             "crop_slack", "pitch_shift", "adversarial", "seed")


def train(args: Settings) -> C.CodecModel:
    """Train the codec, as one process or as one rank of a torchrun job; returns it."""
    resumed = checkpoint_to_resume(args, RUN_FLAGS, ("config",), "train_codec.py")
    run = LongRun(args.out_dir, args.max_iters, args.eval_interval, pick_device(args.device), resumed,
                  advice=f"try a lower --lr (this run: {args.lr:g})", desc="training codec", draw=codec_curves)
    device = run.device
    if args.batch_size % run.world:
        raise DataError(f"--batch-size {args.batch_size} must be a multiple of the {run.world} processes")
    torch.manual_seed(args.seed + run.rank)   # each rank its own noise and dead-code restarts
    notes = run.on_rank_zero_first(lambda: load_notes(args)) or load_notes(args, verbose=False)

    # The codec, and Adam (fused: its kernel can skip a step on the device, which run.skip_if_not_finite asks of it).
    # The published architecture has no harmonic synthesizer, so its phases can follow the input: EnCodec's L1 x 0.1.
    sized = {"w_l1": 0.1} if args.size == "encodec" else {"width": args.width}
    cfg = C.CodecConfig(**resumed["config"]) if resumed else C.CodecConfig(size=args.size, **sized)
    model = C.make_codec(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    disc = disc_optimizer = None
    if args.adversarial:  # EnCodec's discriminator, and its own optimizer
        disc = make_discriminator().to(device)
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    batches = torch.Generator().manual_seed(args.seed)   # notes, crops and bandwidth of each step: same on all ranks
    if not resumed:  # codebooks from k-means on the (random) encoder's latents of up to 64 notes: every rank the same
        model.init_codebooks(notes["train"][:64, :notes["frames"] * HOP].to(device), seed=args.seed)
    # on --resume: the weights, the optimizers and the random streams put back
    run.start(model, optimizer, batches, also={"disc": disc, "disc_optimizer": disc_optimizer} if disc else {})
    raw_model = model
    model = run.wrap(model)   # the codebooks are buffers updated in the forward pass: every rank gets rank 0's
    if run.master:
        print(f"{len(notes['train'])} training notes, {len(notes['valid'])} held-out notes; {cfg.size} codec, "
              f"{raw_model.num_params() / 1e6:.2f}M parameters; {device}" + (f"; {run.ddp}" if run.ddp else ""))

    def checkpoint(it: int, metrics: dict | None) -> dict:   # ckpt.pt; LongRun adds the optimizers, random states
        return {"config": asdict(cfg), "model": raw_model.state_dict(), "iter_num": it, "metrics": metrics,
                "args": asdict(args)}

    with run:
        for it in range(run.start_iter, args.max_iters + 1):
            if run.should_evaluate(it):  # every --eval-interval steps, and at the end
                metrics = run.evaluate(it, lambda: evaluation(raw_model, notes, args), lr=args.lr,
                                       train_s=round(run.train_s, 1))
                if run.master:
                    tqdm.write(summary_line(metrics))
                    save_checkpoint({"kind": CODEC_FILE_KIND, "config": asdict(cfg), "iter_num": it,
                                     "model": C.inference_state(raw_model), "metrics": metrics},
                                    run.out_dir / "codec.pt")
                run.save(it, checkpoint(it, metrics))
            if it == args.max_iters:
                break

            # One step: the same notes, crops and bandwidth on every rank; each rank takes its share of the notes
            audio, f0, levels = crops(notes, args, batches, run.rank, run.world)
            audio, f0 = audio.to(device), f0.to(device)
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
            run.skip_if_not_finite(loss, grad_norm, it)   # NaN or infinite: the fused step changes nothing
            optimizer.step()
            if run.step_done(it, loss):                   # a signal came: save this step, exit 128 + N
                run.stop(it + 1, checkpoint(it + 1, run.last_metrics))
    if run.master:
        test(raw_model, args, run.out_dir)
        print(f"done: the codec is {run.out_dir / 'codec.pt'}")
    return raw_model


def crops(notes: dict, args: Settings, batches: torch.Generator, rank: int, world: int):
    """One step's batch, drawn the same on every rank: --batch-size notes, a crop of --crop-frames of each (a share
    ONSET_CROPS at the onset), each moved by up to --pitch-shift semitones, and one number of levels (a bandwidth)
    for all. Returns this rank's share: audio (B, samples) and teacher f0 (B,), and the levels."""
    idx = torch.randint(len(notes["train"]), (args.batch_size,), generator=batches)
    start = torch.randint(notes["frames"] + args.crop_slack - args.crop_frames + 1, (args.batch_size,),
                          generator=batches) * HOP
    at_onset = torch.rand(args.batch_size, generator=batches) < ONSET_CROPS
    start = torch.where(at_onset, 0, start)
    semitones = torch.randint(-args.pitch_shift, args.pitch_shift + 1, (args.batch_size,), generator=batches)
    levels = list(C.BANDWIDTH_LEVELS.values())[int(torch.randint(len(C.BANDWIDTH_LEVELS), (1,), generator=batches))]
    share = args.batch_size // world
    mine = slice(rank * share, (rank + 1) * share)
    audio = torch.stack([shifted(notes["train"][i], s, args.crop_frames * HOP, st)
                         for i, s, st in zip(idx[mine].tolist(), start[mine].tolist(), semitones[mine].tolist())])
    return audio, notes["train_f0"][idx[mine]] * 2 ** (semitones[mine] / 12), levels


def shifted(note: torch.Tensor, start: int, length: int, semitones: int) -> torch.Tensor:
    """length samples of note from start, played 2^(semitones/12) times as fast (a tape's pitch shift: the pitch and
    the partials move together, the note's time with them). Trains the codec on pitches between and beyond the
    set's keys: a codec trained on MIDI 40-88 alone never learns the f0 classes of a drop-tuned low string."""
    if not semitones:
        return note[start:start + length]
    n = round(length * 2 ** (semitones / 12))
    crop = torch.nn.functional.pad(note[start:start + n], (0, max(0, start + n - len(note))))
    return torch.nn.functional.interpolate(crop[None, None, None], size=(1, length), mode="bilinear",
                                           antialias=True, align_corners=False)[0, 0, 0]


# ----------------------------------------------------------------------------------------------------
# Evaluation

def evaluation(model: C.CodecModel, notes: dict, args: Settings) -> dict:
    """codec_extras.evaluate on the held-out notes at --eval-bandwidths, flattened into log.jsonl's keys; the loss at
    the first bandwidth is val_loss (what curves.png draws) and its perplexities val_perplexity_per_level."""
    result = evaluate(model, notes["valid"], notes["valid_f0"], bandwidths=args.eval_bandwidths,
                      measure=None if args.no_pitch_eval else pitch_and_level_kept)
    result.pop("audio")
    first = result[f"bw{float(args.eval_bandwidths[0])}"]
    return {"val_loss": first["loss"], "bandwidths": result}


def test(model: C.CodecModel, args: Settings, out_dir: Path) -> dict:
    """At the end, the evaluation on notes of instruments never trained on: --test-notes of the test split (where
    the set has one) and each --test-folders folder. Printed, written to OUT_DIR/test.json, and a few notes of each
    instrument heard and seen on OUT_DIR/reconstructions/index.html."""
    files = resolve_data(args.data, args.data_dir, args.synthetic_notes, args.seed).get("test", [])
    sets = {"test split": spread(files, args.test_notes)} if files else {}
    sets.update({folder: find_audio(folder) for folder in args.test_folders})
    results, lines, page_notes = {}, [], []
    for what, chosen in sets.items():
        audio, f0 = read_notes(chosen, round(args.seconds * FRAME_RATE), what)
        results[what] = evaluation(model, {"valid": audio, "valid_f0": f0}, args)["bandwidths"]
        lines.append(f"{what}, {len(audio)} notes: " + summary_line({"iter": None, "bandwidths": results[what]}))
        print(lines[-1])
        page_notes += [(what, path) for path in page_picks(chosen)]
    if results:
        atomic_write(out_dir / "test.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
        page = reconstruction_page(model, page_notes, args, out_dir / "reconstructions", lines)
        print(f"reconstructions of {len(page_notes)} of them: {page}")
    return results


def page_picks(files: list[Path], per_instrument: int = 4, per_folder: int = 8) -> list[Path]:
    """The notes the reconstruction page shows: a few of each instrument of an NSynth-style set (spread over its
    pitches and velocities), else a few of the folder."""
    instruments = {}
    for f in files:
        instruments.setdefault(f.stem.rsplit("-", 2)[0] if f.stem.count("-") >= 2 else "", []).append(f)
    if "" in instruments:
        return spread(files, per_folder)
    return [f for group in instruments.values() for f in spread(group, per_instrument)]


def reconstruction_page(model: C.CodecModel, notes: list[tuple[str, Path]], args: Settings, out_dir: Path,
                        lines: list[str]) -> Path:
    """Each note and its reconstruction at each --eval-bandwidths as WAVs with spectrograms, and the page."""
    import soundfile as sf

    from figures import spectrogram
    from page import Reconstruction, write_reconstruction_page
    out_dir.mkdir(parents=True, exist_ok=True)
    audio = torch.from_numpy(np.stack([read_audio(p, round(args.seconds * FRAME_RATE) * HOP) for _, p in notes]))
    was_training = model.training
    model.eval()
    played = {"original": audio}
    device = next(model.parameters()).device
    with torch.no_grad():
        for bw in args.eval_bandwidths:
            model.set_target_bandwidth(bw)
            played[str(bw)] = torch.cat([model.decode(model.encode(x.to(device))).cpu() for x in audio.split(8)])
    model.train(was_training)
    rows = []
    for i, (what, path) in enumerate(notes):
        wavs, f0 = {}, {}
        for key, batch in played.items():
            wav = out_dir / f"{i:03d}-{path.stem}-{'original' if key == 'original' else key + 'kbps'}.wav"
            sound = batch[i].numpy()
            sf.write(wav, sound, C.SAMPLE_RATE)
            f0[key] = pitch.estimate_f0(sound, C.SAMPLE_RATE)
            spectrogram(sound, C.SAMPLE_RATE, wav.with_suffix(".png"), f"{path.name}\n{key}", {"f0": f0[key]})
            wavs[key] = wav
        rows.append(Reconstruction(what, path.name, wavs.pop("original"), {float(k): w for k, w in wavs.items()}, f0))
    return write_reconstruction_page(out_dir, rows, lines)


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
    if m["iter"] is None:
        return "; ".join(parts)
    train = f"train loss {m['train_loss']:.3f}, " if m["train_loss"] is not None else ""
    return f"iter {m['iter']}: {train}" + "; ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Data: every note read once into memory (a few hundred notes of 2 s are a few tens of MB)

def load_notes(args: Settings, verbose: bool = True) -> dict:
    """{'train': (N, samples), 'train_f0': (N,), 'valid': (M, frames * HOP), 'valid_f0': (M,), 'frames'}: the first
    --seconds of each note (training notes a little longer, for the crops; --eval-notes of the held-out ones, spread
    over the split), unreadable files skipped with their reason. The teacher f0 is NaN where a note has neither a
    label nor a measurable pitch."""
    files = resolve_data(args.data, args.data_dir, args.synthetic_notes, args.seed)
    frames = round(args.seconds * FRAME_RATE)
    notes = {"frames": frames}
    for name, length in (("train", frames + args.crop_slack), ("valid", frames)):
        chosen = files[name] if name == "train" else spread(files[name], args.eval_notes)
        notes[name], notes[f"{name}_f0"] = read_notes(chosen, length, f"the {name} split of --data {args.data}",
                                                      verbose)
    return notes


def spread(files: list[Path], n: int) -> list[Path]:
    """n of the files, evenly spaced over the sorted list (every instrument, pitch and velocity of a sorted set)."""
    return files if len(files) <= n else [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


def read_notes(files: list[Path], frames: int, what: str, verbose: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The first frames of each readable file (N, frames * HOP) and its teacher f0 (N,); the others reported."""
    audio, used, skipped = [], [], []
    for f in tqdm(files, desc=f"reading {what}", unit="file", disable=None if verbose else True):
        try:
            audio.append(read_audio(f, frames * HOP))
            used.append(f)
        except DataError as e:
            skipped.append((f, str(e)))
    if verbose:
        report_skipped(what, EncodedFiles(np.zeros((0,)), used, skipped))
    if not audio:
        raise DataError(f"no readable audio in {what} ({len(skipped)} files, all skipped)")
    audio = torch.from_numpy(np.stack(audio))
    return audio, teacher_f0(used, audio)


def teacher_f0(files: list[Path], audio: torch.Tensor) -> torch.Tensor:
    """Each note's f0 in Hz: its NSynth label (name or examples.json), else pitch.py's estimate, else NaN."""
    f0 = [pitch.midi_to_hz(label["pitch"]) if label["pitch"] >= 0 else pitch.estimate_f0(a.numpy(), C.SAMPLE_RATE)
          for label, a in zip(labels_of(files), audio)]
    return torch.tensor(f0, dtype=torch.float)


# ----------------------------------------------------------------------------------------------------
# Flags

def parse_args(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data",
                   help="synthetic (generated plucked strings, no network), nsynth-guitar (downloaded once into "
                        "--data-dir) or a folder of .wav/.flac/.mp3/.ogg files (as train.py) (default: %(default)s)")
    d.add_argument("--data-dir", help="where downloads and synthetic notes go (default: %(default)s)")
    d.add_argument("--synthetic-notes", type=positive(int),
                   help="number of notes for --data synthetic; every 10th is held out (default: %(default)s)")
    d.add_argument("--seconds", type=positive(float),
                   help="seconds of each note, from its start, as train.py learns them (default: %(default).3f)")
    t = p.add_argument_group("training")
    t.add_argument("--size", choices=("small", "encodec"),
                   help="small (spectral encoder, harmonic-plus-noise decoder: learns on a CPU) or encodec (the "
                        "published 24 kHz architecture, for GPUs) (default: %(default)s)")
    t.add_argument("--width", type=positive(int),
                   help="channels of the small codec's ConvNeXt blocks (default: %(default)s)")
    t.add_argument("--out-dir", help="codec file, checkpoint and log (default: %(default)s)")
    t.add_argument("--max-iters", type=positive(int), help="optimizer steps (default: %(default)s)")
    t.add_argument("--batch-size", type=positive(int), help="crops per step (default: %(default)s)")
    t.add_argument("--crop-frames", type=positive(int),
                   help="frames per training crop (75 per second) (default: %(default)s)")
    t.add_argument("--crop-slack", type=int, help="crops may reach this many frames past --seconds (default: "
                                                  "%(default)s)")
    t.add_argument("--pitch-shift", type=int, metavar="SEMITONES",
                   help="move each training crop by a random whole number of semitones, up to this many up or down, "
                        "its teacher f0 with it (default: %(default)s)")
    t.add_argument("--lr", type=positive(float), help="Adam learning rate (default: %(default)s)")
    t.add_argument("--adversarial", action="store_true",
                   help="add EnCodec's multi-scale STFT discriminator (hinge loss + feature matching)")
    t.add_argument("--eval-interval", type=positive(int),
                   help="evaluate on the held-out notes and save every N steps (default: %(default)s)")
    t.add_argument("--eval-bandwidths", type=float, nargs="+", choices=sorted(C.BANDWIDTH_LEVELS),
                   help="kbps evaluated (default: 1.5 6)")
    t.add_argument("--eval-notes", type=positive(int),
                   help="held-out notes evaluated, spread over the valid split (default: %(default)s)")
    t.add_argument("--test-notes", type=positive(int),
                   help="at the end, notes of the test split evaluated (instruments never trained on) "
                        "(default: %(default)s)")
    t.add_argument("--test-folders", nargs="+", metavar="FOLDER",
                   help="at the end, evaluate on these folders' notes too (e.g. recorded guitars)")
    t.add_argument("--no-pitch-eval", action="store_true",
                   help="skip pitch and level kept in evaluations (for tests)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), help="(default: %(default)s)")
    t.add_argument("--seed", type=int, help="seed of the notes, initialisation and batches (default: %(default)s)")
    t.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt exactly where it stopped")
    p.set_defaults(**asdict(Settings()))
    args = Settings(**vars(p.parse_args(argv)))
    if args.crop_frames > round(args.seconds * FRAME_RATE) + args.crop_slack:
        p.error(f"--crop-frames {args.crop_frames} is longer than --seconds plus --crop-slack")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    train_or_exit(lambda: train(args))


if __name__ == "__main__":
    main()
