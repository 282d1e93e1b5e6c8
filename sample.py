"""
Sample new notes from a trained codecgpt model and write them as WAV files.

    python sample.py                                  # 4 notes from out/best.pt into samples/
    python sample.py --num-samples 16 --temperature 0.9 --top-k 200
    python sample.py --xt-checkpoint model_gen_autoreg_transformer.pth   # the reference notebook's model

Each note starts from BOS; every new token is drawn only among the codes of the codec level its position holds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from data import FRAME_RATE, SAMPLE_RATE, Codec, CodecTokenizer, DataError
from model import GPT, CheckpointError, load_checkpoint, model_from_checkpoint
from train import codec_from_checkpoint, non_negative, pick_device, positive


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/best.pt", help="checkpoint written by train.py (default: out/best.pt)")
    p.add_argument("--xt-checkpoint", default=None,
                   help="instead of --ckpt: a state dict saved by the reference notebook (x-transformers "
                        "TransformerWrapper, shared code ids, start token 0, pretrained codec at 1.5 kbps)")
    p.add_argument("--xt-heads", type=positive(int), default=4, help="heads of the --xt-checkpoint model (default: 4)")
    p.add_argument("--xt-dim-head", type=positive(int), default=64,
                   help="head width of the --xt-checkpoint model (default: 64)")
    p.add_argument("--codec-weights", default=None,
                   help="local encodec_24khz-d7cc33bc.th, for checkpoints trained with the pretrained codec")
    p.add_argument("--num-samples", type=positive(int), default=4, help="notes to generate (default: 4)")
    p.add_argument("--batch-size", type=positive(int), default=16, help="notes generated at once (default: 16)")
    p.add_argument("--seconds", type=positive(float), default=None,
                   help="length of each note (default and maximum: the length the model was trained on)")
    p.add_argument("--temperature", type=non_negative(float), default=1.0,
                   help="sampling temperature, 0 = always the most likely token (default: 1.0)")
    p.add_argument("--top-k", type=positive(int), default=None, help="sample among the k most likely codes (default: off)")
    p.add_argument("--top-p", type=probability, default=None,
                   help="sample among the most likely codes whose probability adds up to p, in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out-dir", default="samples", help="where sample_{i}.wav go (default: samples)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda when available (default: auto)")
    p.add_argument("--attention", choices=("auto", "explicit", "fused"), default="auto",
                   help="attention path; auto = fused on CUDA, explicit on CPU (default: auto)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="re-run the whole sequence for every token, like the reference (slow; for comparison)")
    return p.parse_args(argv)


def load_model(args) -> tuple[GPT, CodecTokenizer, Codec]:
    """The model, its tokenizer and the codec it was trained with, from --ckpt or --xt-checkpoint."""
    if args.xt_checkpoint:
        state = load_checkpoint(args.xt_checkpoint)
        try:
            model = GPT.from_x_transformers(state, heads=args.xt_heads, dim_head=args.xt_dim_head, max_seq_len=250)
        except ValueError as e:
            raise CheckpointError(f"{args.xt_checkpoint}: {e}") from None
        tokenizer = CodecTokenizer(levels=2, layout="shared")
        return model, tokenizer, Codec.pretrained(1.5, args.codec_weights)
    ckpt = load_checkpoint(args.ckpt)
    if "codec" not in ckpt or "tokenizer" not in ckpt:
        raise CheckpointError(f"{args.ckpt}: not a codecgpt checkpoint (no codec or tokenizer); "
                              "for the reference notebook's weights use --xt-checkpoint")
    model = model_from_checkpoint(ckpt, args.ckpt)
    try:
        tokenizer = CodecTokenizer(**ckpt["tokenizer"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{args.ckpt}: its tokenizer entry is unusable ({e})") from None
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(f"{args.ckpt}: its tokenizer ({tokenizer.vocab_size} tokens) does not fit its model "
                              f"({model.cfg.vocab_size} tokens)")
    codec = codec_from_checkpoint(ckpt, args.ckpt, args.codec_weights)
    if codec.levels != tokenizer.levels:
        raise CheckpointError(f"{args.ckpt}: its codec has {codec.levels} levels, its tokenizer {tokenizer.levels}")
    return model, tokenizer, codec


def sample(args) -> list[Path]:
    device = pick_device(args.device)
    model, tokenizer, codec = load_model(args)
    model.to(device).eval()
    codec.to(device)
    model.set_attention(args.attention if args.attention != "auto" else ("fused" if device == "cuda" else "explicit"))

    max_frames = model.cfg.max_seq_len // tokenizer.levels
    frames = max_frames if args.seconds is None else round(args.seconds * FRAME_RATE)
    if not 0 < frames <= max_frames:
        raise DataError(f"--seconds {args.seconds}: this model makes at most {max_frames / FRAME_RATE:.3f} s "
                        f"({max_frames} frames)")
    new_tokens = frames * tokenizer.levels
    allowed = tokenizer.allowed(1 + new_tokens, device)
    generator = torch.Generator(device).manual_seed(args.seed)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, gen_time, total_start = [], 0.0, time.time()
    with tqdm(total=args.num_samples, desc="sampling", unit="note", disable=None) as bar:
        for start in range(0, args.num_samples, args.batch_size):
            n = min(args.batch_size, args.num_samples - start)
            prompt = torch.full((n, 1), tokenizer.bos, dtype=torch.long, device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.time()
            tokens = model.generate(prompt, new_tokens, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, use_kv_cache=not args.no_kv_cache, generator=generator,
                                    allowed=allowed)
            if device == "cuda":
                torch.cuda.synchronize()
            gen_time += time.time() - t
            audio = codec.decode(tokenizer.decode(tokens)).clamp(-1, 1).cpu().numpy()
            for i, wav in enumerate(audio):
                path = out_dir / f"sample_{start + i}.wav"
                sf.write(path, wav.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
                written.append(path)
            bar.update(n)
    total = time.time() - total_start
    seconds_audio = args.num_samples * frames / FRAME_RATE
    print(f"wrote {len(written)} notes of {frames / FRAME_RATE:.3f} s to {out_dir}/; "
          f"{args.num_samples * new_tokens / gen_time:.0f} tokens/s, real-time factor {seconds_audio / total:.2f} "
          f"({seconds_audio:.1f} s of audio in {total:.1f} s, codec decoding included)")
    return written


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        sample(args)
    except (DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
