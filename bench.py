"""
Benchmarks: codecgpt side by side with x-transformers and the reference recipe, in one run.

    python bench.py                       # CPU: sampling, training steps, encoding; prints a table
    python bench.py --device cuda         # the same on a GPU, plus compiled decoding, --compile training and MFU
    python bench.py --json bench.json     # also write every number (rewritten after every row)
    python bench.py --only patterns       # one part: sample, train, encode, patterns, guard, codec or report
    python bench.py --only weights --ckpt out/best.pt   # a trained model's held-out loss and speed per weight format
    python bench.py --only sizes          # each weight format on models past the CPU's cache
    python bench.py --device cuda --quick # the GPU check's short run (.ci/gpu): the rows of the H100 targets

x-transformers is imported here and in the tests only (it is a dev dependency, requirements-dev.txt); codecgpt itself
never uses it. The reference model (TransformerWrapper + Decoder(rotary_pos_emb=True), dim 256, depth 6, heads 4,
1024 tokens) is built with it, and its weights are copied into codecgpt's GPT with GPT.from_x_transformers, so both
sample with the same weights and the same settings: temperature 1, no filtering (the reference's plain multinomial).

Each row is the median of --repeats timed runs after one warm-up run. Ratios are taken within this run, so they hold
on a noisy machine. Peak memory is the process's peak resident set during the row (CPU) or the rise of
torch.cuda.max_memory_allocated (GPU).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

import data
import prepare
from files import atomic_write
from long_run import NonFiniteSteps
from cli import native_bf16
from model import GPT, CompiledDecoder, GPTConfig, Int8Linear, quantize_weights
from sample import first_sound

REAL_GUITAR = Path(__file__).resolve().parent.parent / "shared" / "data" / "real-guitar"
REFERENCE = dict(num_tokens=1024, max_seq_len=250, dim=256, depth=6, heads=4)
SAMPLE_TOKENS = 250          # the reference's length: 125 frames x 2 levels = 1.667 s of audio
SECONDS_PER_TOKEN = 1 / (data.FRAME_RATE * 2)
H100_BF16_FLOPS = 989e12     # dense bf16 peak of an H100 SXM: MFU is reported against it whatever the GPU


# ----------------------------------------------------------------------------------------------------
# Measuring

class PeakMemory:
    """Peak memory while the code inside `with` runs: the CUDA allocator's peak above what was allocated before,
    or on CPU the peak resident set of the whole process (Linux VmHWM, reset at the start by /proc/self/clear_refs
    after malloc_trim; it includes torch itself and the models of the section, about 0.4 GB)."""

    def __init__(self, device: str):
        self.device, self.peak_mb = device, float("nan")

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)   # give memory that earlier rows freed back to the OS
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")                          # reset the high-water mark to what is in use now
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            try:
                status = open("/proc/self/status").read()
                self.peak_mb = int(status.split("VmHWM:")[1].split()[0]) / 1024
            except (OSError, IndexError, ValueError):
                pass


def timed(fn, repeats: int, device: str, warmup: int = 1) -> dict:
    """Median wall time of fn() over `repeats` runs after `warmup` runs, and the peak memory of the timed runs."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "runs": [round(t, 4) for t in times], "peak_mb": mem.peak_mb}


ROWS: list[dict] = []
SAVE_ROWS = None   # main() sets it with --json: every row is written at once, so a run cut short keeps its rows


def report(section: str, name: str, result: dict, per_second: float, unit: str, baseline: str | None = None,
           **extra) -> dict:
    row = {"section": section, "name": name, **result, unit: per_second, "unit": unit, **extra}
    base = next((r for r in ROWS if r["section"] == section and r["name"] == baseline), None)
    row["vs"] = baseline
    row["ratio"] = base["seconds"] / result["seconds"] if base else None
    ROWS.append(row)
    ratio = f"{row['ratio']:6.2f}x vs {baseline}" if base else ""
    extras = "".join(f"  {k} {v:.3g}" for k, v in extra.items() if isinstance(v, float))
    label = f"{section.removeprefix('patterns ')}: {name}" if section.startswith("patterns") else name
    print(f"  {label:<44} {result['seconds']:8.3f} s  {per_second:10.1f} {unit:<9} "
          f"peak {result['peak_mb']:7.1f} MB  {ratio}{extras}", flush=True)
    if SAVE_ROWS:
        SAVE_ROWS()
    return row


# ----------------------------------------------------------------------------------------------------
# Sampling

def reference_models(device: str):
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=REFERENCE["num_tokens"], max_seq_len=REFERENCE["max_seq_len"],
                             emb_dropout=0.1, attn_layers=Decoder(dim=REFERENCE["dim"], depth=REFERENCE["depth"],
                                                                  heads=REFERENCE["heads"], rotary_pos_emb=True,
                                                                  attn_dropout=0.1, ff_dropout=0.1))
    net = net.to(device).eval()
    ours = GPT.from_x_transformers(net.state_dict(), heads=REFERENCE["heads"]).to(device).eval()
    return net, AutoregressiveWrapper(net).eval(), ours


def naive_generate(net, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The reference recipe's loop: the whole sequence so far is run again for every new token."""
    x = prompt
    with torch.inference_mode():
        for _ in range(new_tokens):
            probs = net(x)[:, -1].softmax(dim=-1)
            x = torch.cat((x, torch.multinomial(probs, 1)), dim=1)
    return x


def weight_formats(device: str) -> list[str]:
    """The weight formats to time: float32 and int8 everywhere, bfloat16 where the device has it natively."""
    return ["float32", "int8"] + (["bfloat16"] if native_bf16(device) else [])


def matmul_floor(model: GPT, batch: int, device: str, repeats: int, steps: int = 50) -> dict:
    """The machine's own limit for one decoding step of model: its matrix products alone (every Linear or Int8Linear
    once, the same shapes and weight format, on one position of `batch` rows), nothing else: no attention, norms,
    sampling or Python between them. At batch 1 that is streaming every weight once; no decoder of these weights
    takes less. Returns timed()'s result for one step."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    inputs = [torch.randn(batch, 1, m.in_features, dtype=model.embed.weight.dtype, device=device) for m in layers]

    def products():
        with torch.inference_mode():
            for _ in range(steps):
                for layer, x in zip(layers, inputs):
                    layer(x)
    r = timed(products, repeats, device)
    return {**r, "seconds": r["seconds"] / steps}


def add_floor_share(row: dict, floor: dict) -> None:
    """The share of the floor a sampling row reaches: the floor's time for the same steps / the row's time."""
    row["floor_share"] = floor["seconds"] / row["seconds"]
    print(f"  {'':<44} {100 * row['floor_share']:5.1f}% of the floor ({row['name']})")


def bench_sampling(args) -> None:
    new = args.sample_tokens
    print(f"\nsampling {new} tokens from BOS, reference model, temperature 1, no filtering; float32 unless named")
    net, wrapper, ours = reference_models(args.device)
    no_filter = lambda logits, **kwargs: logits  # noqa: E731
    ours.set_attention("fused")
    models = {"float32": ours}
    for kind in weight_formats(args.device)[1:]:
        models[kind] = quantize_weights(ours, kind)
        models[kind].set_attention("fused")
    compiled = None
    if args.device == "cuda" or args.compile:
        # (on a CPU inductor cannot compile torch's int8 kernel, torch 2.11: sample.py refuses that pair too)
        compiled = {kind: CompiledDecoder(m, mode="reduce-overhead" if args.device == "cuda" else None)
                    for kind, m in models.items() if args.device == "cuda" or kind != "int8"}
    for batch in args.batches:
        section = f"sample b{batch}"
        print(f" batch {batch}:")
        prompt = torch.zeros(batch, 1, dtype=torch.long, device=args.device)
        tokens = batch * new
        audio = tokens * SECONDS_PER_TOKEN

        def row(name, fn, repeats=args.repeats, baseline="x-transformers generate(cache_kv=True)"):
            r = timed(fn, repeats, args.device)
            return report(section, name, r, tokens / r["seconds"], "tokens/s", baseline,
                          realtime_factor=audio / r["seconds"])

        floors = {}   # the floor of each weight format, for all the steps of a row: new tokens x one step
        for kind, model in models.items():
            step = matmul_floor(model, batch, args.device, args.repeats)
            floors[kind] = report(section, f"matrix products alone, {kind} (the floor)",
                                  {**step, "seconds": step["seconds"] * new}, tokens / (step["seconds"] * new),
                                  "tokens/s")
        with torch.inference_mode():
            r = row("x-transformers generate(cache_kv=True)",
                    lambda: wrapper.generate(prompt, new, filter_logits_fn=no_filter, cache_kv=True), baseline=None)
        add_floor_share(r, floors["float32"])
        if batch <= args.naive_max_batch:
            # The naive loop grows quadratically: at batch 16 one run takes ~40 s on 2 cores, so it runs once there.
            row("reference naive loop (no cache)", lambda: naive_generate(net, prompt, new),
                repeats=args.repeats if batch == 1 else 1)
        else:
            print(f"  {'reference naive loop (no cache)':<44} skipped (--naive-max-batch {args.naive_max_batch})")
        for kind, model in models.items():
            weights = "" if kind == "float32" else f", {kind} weights"
            r = row(f"codecgpt generate (KV cache){weights}", lambda: model.generate(prompt, new))
            add_floor_share(r, floors[kind])
            if compiled is not None and kind in compiled:
                r = row(f"codecgpt generate (compiled decode){weights}",
                        lambda: model.generate(prompt, new, decoder=compiled[kind]))
                add_floor_share(r, floors[kind])
        naive = next((r for r in ROWS if r["section"] == section and r["name"].startswith("reference naive")), None)
        for r in ROWS:
            if naive and r["section"] == section and r["name"].startswith("codecgpt"):
                r["ratio_vs_naive"] = naive["seconds"] / r["seconds"]
                print(f"  {r['name']:<44} {r['ratio_vs_naive']:6.2f}x vs the naive loop")


def bench_sizes(args) -> None:
    """Each weight format at batch 1 on models past the cache: the reference size (21 MB of float32 products), dim 512
    / depth 8 (105 MB) and dim 1024 / depth 12 (613 MB), random weights, 50 tokens from BOS. Where the weights no
    longer fit the CPU's cache the floor is memory's, and int8's quarter of the bytes should show."""
    prompt = torch.zeros(1, 1, dtype=torch.long, device=args.device)
    print("\nweight formats by model size: batch 1, 50 tokens from BOS")
    for dim, depth in ((REFERENCE["dim"], REFERENCE["depth"]), (512, 8), (1024, 12)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=2049, max_seq_len=64, dim=dim, depth=depth, heads=dim // 64))
        model.to(args.device).eval()
        megabytes = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) * 4 / 1e6
        section = f"sizes dim {dim} depth {depth}"
        print(f" dim {dim}, depth {depth}: {megabytes:.0f} MB of float32 matrices")
        for kind in weight_formats(args.device):
            sampler = model if kind == "float32" else quantize_weights(model, kind)
            sampler.set_attention("fused")
            floor = matmul_floor(sampler, 1, args.device, args.repeats, steps=20)["seconds"] * 50
            r = timed(lambda: sampler.generate(prompt, 50), args.repeats, args.device)
            report(section, kind, r, 50 / r["seconds"], "tokens/s", baseline="float32",
                   float32_megabytes=megabytes, floor_share=floor / r["seconds"])


def bench_weights(args) -> None:
    """A trained checkpoint (--ckpt) sampled with each weight format: on its held-out notes (train.py's validation
    split, through train.py's evaluate), the loss and accuracy, how often the most likely next token is float32's, and
    the mean KL divergence of the next-token distributions from float32's; then one note from BOS at batch 1."""
    import dataclasses
    import train
    from checkpoint import load_checkpoint, model_from_checkpoint
    from codec_kinds import codec_from_checkpoint
    ckpt = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(ckpt, args.ckpt).to(args.device).eval()
    model.set_attention("fused")
    names = {f.name for f in dataclasses.fields(train.Settings)}
    settings = train.Settings(**{k: v for k, v in ckpt["args"].items() if k in names})
    codec = codec_from_checkpoint(ckpt, args.ckpt, None)
    _, tokenizer, _, valid = train.prepare_data(settings, args.device, codec, verbose=False)
    tokens = valid.tokens[:args.weights_notes].to(args.device)
    print(f"\nweight formats: {args.ckpt}, {len(tokens)} held-out notes of --data {settings.data}, "
          f"{tokenizer.pattern} pattern")
    with torch.inference_mode():
        reference = torch.cat([model(batch[..., :-1]).float().log_softmax(-1) for batch in tokens.split(16)])
    prompt = tokens[:1, ..., :tokenizer.prefix]
    allowed = tokenizer.allowed(tokens.shape[-1], args.device)
    section = "weights"
    for kind in weight_formats(args.device):
        sampler = model if kind == "float32" else quantize_weights(model, kind)
        sampler.set_attention("fused")
        with torch.inference_mode():
            logp = torch.cat([sampler(batch[..., :-1]).float().log_softmax(-1) for batch in tokens.split(16)])
            m = train.evaluate(sampler, tokens, tokenizer, 16, args.device, nullcontext())
        sampler.eval()  # (evaluate leaves a model in training mode)
        # over code positions only (tokenizer.per_code): not BOS, the conditions or the delay pattern's holes
        same = tokenizer.per_code(logp.argmax(-1) == reference.argmax(-1)).float().mean().item()
        kl = tokenizer.per_code((reference.exp() * (reference - logp)).sum(-1)).mean().item()
        steps = tokens.shape[-1] - tokenizer.prefix
        r = timed(lambda: sampler.generate(prompt, steps, allowed=allowed), args.repeats, args.device)
        report(section, kind, r, tokenizer.frames(steps) / r["seconds"], "frames/s", baseline="float32",
               val_loss=m["val_loss"], val_accuracy=m["val_accuracy"], same_argmax=same, kl_nats=kl)


# ----------------------------------------------------------------------------------------------------
# Training steps

def train_flops_per_token(model: torch.nn.Module, dim: int, depth: int, seq_len: int) -> float:
    """6 FLOPs per parameter per token (forward + backward), plus attention's 12 * depth * dim * seq_len (PaLM)."""
    params = sum(p.numel() for p in model.parameters())
    return 6 * params + 12 * depth * dim * seq_len


def bench_training(args) -> None:
    from x_transformers import Decoder, TransformerWrapper
    device = args.device
    bf16_ok = native_bf16(device)
    configs = [("reference", REFERENCE["dim"], REFERENCE["depth"], REFERENCE["heads"], args.train_batches)]
    if device == "cuda":
        configs.append(("dim 512 depth 12", 512, 12, 8, [32]))
    elif args.quick:  # .ci/gpu --cpu tests the script on a CPU: a size whose steps take milliseconds
        configs = [("tiny dim 64 depth 2", 64, 2, 2, args.train_batches)]
    for label, dim, depth, heads, batches in configs:
        for batch in batches:
            section = f"train {label} b{batch}"
            seq = REFERENCE["max_seq_len"]
            print(f"\ntraining step ({label}, batch {batch} x {seq + 1}): forward, cross-entropy, backward, AdamW")
            x = torch.randint(0, REFERENCE["num_tokens"], (batch, seq + 1), device=device)

            def step_fn(model, autocast):
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

                def step():
                    with autocast:
                        logits = model(x[:, :-1])
                    loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                return step

            def row(name, model, autocast=nullcontext(), baseline="x-transformers float32"):
                repeats = args.repeats if batch <= 32 else max(1, args.repeats - 1)
                r = timed(step_fn(model, autocast), repeats, device, warmup=2 if "compile" in name else 1)
                flops = train_flops_per_token(model, dim, depth, seq) * batch * seq / r["seconds"]
                extra = {"tflops": flops / 1e12}
                if device == "cuda":
                    extra["mfu"] = flops / H100_BF16_FLOPS
                report(section, name, r, batch * seq / r["seconds"], "tokens/s", baseline, **extra)

            # x-transformers as the reference runs it (float32), with its flash attention, and with flash under
            # bf16 autocast (the fairest comparison for our bf16 rows)
            xt_rows = [(False, "float32"), (True, "float32"), (True, "bfloat16")]
            if args.quick:
                xt_rows = [(False, "float32"), (True, "bfloat16" if bf16_ok else "float32")]
            for flash, dtype in xt_rows:
                if dtype == "bfloat16" and not bf16_ok:
                    continue
                torch.manual_seed(0)
                xt = TransformerWrapper(num_tokens=REFERENCE["num_tokens"], max_seq_len=seq, emb_dropout=0.1,
                                        attn_layers=Decoder(dim=dim, depth=depth, heads=heads, rotary_pos_emb=True,
                                                            attn_dropout=0.1, ff_dropout=0.1, attn_flash=flash))
                autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
                row(f"x-transformers {dtype}" + (" attn_flash" if flash else ""), xt.to(device).train(), autocast,
                    baseline=None if not flash and dtype == "float32" else "x-transformers float32")
                del xt
            variants = [("explicit", "float32"), ("fast", "float32"), ("fused", "float32")]
            if bf16_ok:
                variants += [("explicit", "bfloat16"), ("fast", "bfloat16"), ("fused", "bfloat16")]
            if args.quick:  # the fused path is the one train.py takes on CUDA
                variants = [v for v in variants if v[0] == "fused"]
            for attention, dtype in variants:
                torch.manual_seed(0)
                model = GPT(GPTConfig(vocab_size=REFERENCE["num_tokens"], max_seq_len=seq, dim=dim, depth=depth,
                                      heads=heads)).to(device).train()
                model.set_attention(attention)
                autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
                row(f"codecgpt {attention} {dtype}", model, autocast)
                if (device == "cuda" or args.compile) and attention == "fused" and dtype == ("bfloat16" if bf16_ok
                                                                                              else "float32"):
                    row(f"codecgpt {attention} {dtype} --compile", torch.compile(model), autocast)
                del model
            if not bf16_ok:
                print("  (this CPU has no bf16 support: bfloat16 rows skipped)")


# ----------------------------------------------------------------------------------------------------
# The non-finite step guard (long_run.py): what train.py's step costs with it

def bench_guard(args) -> None:
    """train.py's step (forward, cross-entropy, backward, clip_grad_norm_, AdamW) as it was before the guard
    (foreach AdamW on CPU, no check), with fused AdamW alone, and with fused AdamW and the guard's check, which
    is what train.py runs now; then the check alone. The check is a few scalar operations on the device (and an
    all-reduce under torchrun). The three steps are timed in turn, one step each per round, so that a machine whose
    speed drifts (a shared CPU) slows all three alike."""
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dim, depth, heads, batch = (64, 2, 2, 4) if args.quick and device == "cpu" else (
        REFERENCE["dim"], REFERENCE["depth"], REFERENCE["heads"], 16)
    seq = REFERENCE["max_seq_len"]
    section = f"guard dim {dim} depth {depth} b{batch}"
    print(f"\ntraining step with and without the non-finite step guard (dim {dim}, depth {depth}, batch {batch} x "
          f"{seq + 1}, float32, grad clip 1.0), interleaved")
    x = torch.randint(0, REFERENCE["num_tokens"], (batch, seq + 1), device=device)

    def train_step(fused: bool, check: bool):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=REFERENCE["num_tokens"], max_seq_len=seq, dim=dim, depth=depth,
                              heads=heads, dropout=0.0)).to(device).train()
        model.set_attention("fused" if device == "cuda" else "fast")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or device == "cuda")
        guard = NonFiniteSteps(opt, device, advice="") if check else None

        def step():
            loss = F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if guard is not None:
                guard.check(loss, norm, 0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    baseline = "AdamW, no check (before)"
    steps = {baseline: train_step(False, False), "fused AdamW, no check": train_step(True, False),
             "fused AdamW + non-finite check": train_step(True, True)}
    for _ in range(2):  # warm-up
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    with PeakMemory(device) as mem:
        for _ in range(args.repeats):
            for name, step in steps.items():
                sync()
                t = time.perf_counter()
                step()
                sync()
                times[name].append(time.perf_counter() - t)
    for name, runs in times.items():
        r = {"seconds": statistics.median(runs), "runs": [round(t, 4) for t in runs], "peak_mb": mem.peak_mb}
        report(section, name, r, batch * seq / r["seconds"], "tokens/s", baseline=baseline)

    guard = NonFiniteSteps(torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True),
                           device, advice="")
    loss, norm = torch.tensor(2.0, device=device), torch.tensor(1.0, device=device)
    r = timed(lambda: [guard.check(loss, norm, 0) for _ in range(1000)], args.repeats, device)
    r["seconds"] /= 1000
    report(section, "the check alone (one step's)", r, 1 / r["seconds"], "checks/s")


# ----------------------------------------------------------------------------------------------------
# Encoding

def reference_encode(files: list[Path], codec: data.Codec, frames: int) -> None:
    """The reference recipe's dataset: one file at a time, read whole, encoded whole, then cut to `frames`."""
    from encodec.utils import convert_audio
    for f in files:
        audio, sr = sf.read(f, dtype="float32", always_2d=True)
        wav = convert_audio(torch.from_numpy(audio.T), sr, data.SAMPLE_RATE, 1)
        codec.encode(wav)[:, :, :frames]


def bench_encoding(args) -> None:
    frames = data.DEFAULT_FRAMES
    weights = Path(torch.hub.get_dir()) / "checkpoints" / "encodec_24khz-d7cc33bc.th"
    try:
        if args.quick and not weights.exists():  # no download attempt: the GPU machine has no network
            raise data.DataError("--quick uses the pretrained weights only when torch.hub has them")
        codec, kind = data.Codec.pretrained(1.5), "pretrained"
    except data.DataError:
        codec, kind = data.Codec.untrained(1.5, seed=0), "untrained (same network, so the same speed)"
    codec.to(args.device)
    seconds = 2.0 if args.quick else 4.0  # --quick: 1.67 s are encoded, and making longer notes takes CPU time
    with tempfile.TemporaryDirectory() as tmp:
        folders = [(f"synthetic {seconds:g} s notes",
                    prepare.make_synthetic(Path(tmp) / "notes", num_notes=args.notes, seed=0, seconds=seconds))]
        if args.quick:
            pass  # the real notes are not on the GPU machine, and the targets are measured on the synthetic ones
        elif REAL_GUITAR.is_dir():
            folders.append(("real guitar notes", REAL_GUITAR))
        else:
            print(f"\n(real notes not found at {REAL_GUITAR}: that encoding row is skipped)")
        for label, folder in folders:
            files = data.find_audio(folder)
            section = f"encode {label}"
            print(f"\nencoding {len(files)} {label} ({frames} frames each) with the {kind} codec on {args.device}")
            if not args.quick:  # one file at a time is the CPU-bound baseline; --quick keeps to the target's rows
                r = timed(lambda: reference_encode(files, codec, frames), 1, args.device)
                report(section, "one file at a time, whole file (reference)", r, len(files) / r["seconds"], "notes/s")
                r = timed(lambda: [codec.encode(torch.from_numpy(data.read_audio(f, frames * data.HOP))[None])
                                   for f in files], 1, args.device)
                report(section, "one file at a time, first 1.67 s only", r, len(files) / r["seconds"], "notes/s",
                       "one file at a time, whole file (reference)")
            r = timed(lambda: data.encode_files(files, codec, frames, desc="bench"), 1, args.device)
            report(section, "codecgpt encode_files (batched)", r, len(files) / r["seconds"], "notes/s",
                   "one file at a time, whole file (reference)")
            # The codec alone, on audio already read: encode_files also reads and resamples every file on one CPU
            # core, so this row tells the codec's own speed on the device from the reading's.
            audio = torch.from_numpy(np.stack([data.read_audio(f, frames * data.HOP) for f in files]))
            batch = 64 if args.device == "cuda" else 4   # encode_files' batch sizes
            r = timed(lambda: [codec.encode(chunk) for chunk in audio.split(batch)], 1, args.device)
            report(section, f"codec.encode only (audio already read, batches of {batch})", r,
                   len(files) / r["seconds"], "notes/s", "one file at a time, whole file (reference)")
            cache = Path(tmp) / f"cache-{len(ROWS)}.npz"
            data.encode_files(files, codec, frames, cache=cache, desc="bench")
            r = timed(lambda: data.encode_files(files, codec, frames, cache=cache), 3, args.device)
            report(section, "codecgpt token cache reload", r, len(files) / r["seconds"], "notes/s",
                   "one file at a time, whole file (reference)")


# ----------------------------------------------------------------------------------------------------
# Codebook patterns: what a note costs with each (tokenizer.py)

PATTERN_ROWS = [("flatten", 1.5), ("delay", 1.5), ("parallel", 1.5), ("flatten", 6.0), ("delay", 6.0),
                ("parallel", 6.0)]


def bench_codec(args) -> None:
    """The codec trained here (codec.py): training steps/s of the small codec and of the published architecture
    (--size encodec) at train_codec.py's batch (16 crops of 32 frames, 2 codebooks: the bandwidth it draws is
    random), and notes/s encoding and decoding 1.67 s notes at 1.5 kbps, the small codec beside the published
    architecture (whose untrained weights cost what the released ones do)."""
    import codec as C
    frames, batch, crop = data.DEFAULT_FRAMES, 4 if args.quick and args.device == "cpu" else 16, 32 * data.HOP
    generator = torch.Generator().manual_seed(0)
    print(f"\n== codec: training step at batch {batch} x 32 frames, encode/decode of {frames}-frame notes")
    for size in ("small", "encodec"):
        torch.manual_seed(0)
        model = C.make_codec(C.CodecConfig(size=size, **({"w_l1": 0.1} if size == "encodec" else {})))
        model.to(args.device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        audio = (0.1 * torch.randn(batch, crop, generator=generator)).to(args.device)
        f0 = torch.full((batch,), 220.0, device=args.device)

        def step():
            loss, _, _ = C.codec_loss(model, audio, 2, f0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        r = timed(step, args.repeats, args.device)
        report("codec train", f"{size} ({model.num_params() / 1e6:.1f}M parameters)", r, 1 / r["seconds"],
               "steps/s", baseline="small (3.6M parameters)" if size == "encodec" else None)
    notes = (0.1 * torch.randn(args.notes, frames * data.HOP, generator=generator)).to(args.device)
    for size in ("small", "encodec"):
        torch.manual_seed(0)
        model = C.make_codec(C.CodecConfig(size=size)).to(args.device).eval()
        model.set_target_bandwidth(1.5)
        with torch.inference_mode():
            r = timed(lambda: model.encode(notes), args.repeats, args.device)
            report("codec encode 1.5 kbps", size, r, args.notes / r["seconds"], "notes/s",
                   baseline="small" if size == "encodec" else None)
            codes = model.encode(notes)
            r = timed(lambda: model.decode(codes), args.repeats, args.device)
            report("codec decode 1.5 kbps", size, r, args.notes / r["seconds"], "notes/s",
                   baseline="small" if size == "encodec" else None)
    # the held-out evaluation as train_codec.py runs it (codec_extras.evaluate: the loss, the reconstructions, their
    # SI-SNR and mel distance) of the small codec: 8 notes at a time against one at a time, its default on a CPU
    from codec_extras import evaluate
    model, f0 = C.make_codec(C.CodecConfig(size="small")).to(args.device), torch.full((args.notes,), 220.0)
    for batch in (8, 1):
        r = timed(lambda: evaluate(model, notes, f0, bandwidths=(1.5,), batch_size=batch), args.repeats, args.device)
        report("codec evaluate 1.5 kbps", f"small, {batch} at a time", r, args.notes / r["seconds"], "notes/s",
               baseline="small, 8 at a time" if batch == 1 else None)


# ----------------------------------------------------------------------------------------------------
# The report

def bench_report(args) -> None:
    """sample.py --report's measuring (pitch.pitch_report: Praat's pitch, the levels and a spectrogram of each note)
    of --notes plucks of 1.67 s, in this process and in a worker process per core (what it does from
    pitch.POOL_MIN_NOTES notes on), the workers' start included."""
    import contextlib
    import io

    import pitch
    rng, smallest_pool = np.random.default_rng(0), pitch.POOL_MIN_NOTES
    print(f"\n== report: {args.notes} notes measured and drawn")
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for i in range(args.notes):
            path, midi = Path(tmp) / f"pluck_{i}.wav", 40 + i % 49
            sf.write(path, prepare.pluck(midi, 100, 1.67, data.SAMPLE_RATE, 0.996, 0.7, rng), data.SAMPLE_RATE)
            items.append((path, midi, 100))
        try:
            for name, pool_from in (("one process", 10**9), ("a worker per core", 1)):
                pitch.POOL_MIN_NOTES = pool_from
                with contextlib.redirect_stdout(io.StringIO()):
                    r = timed(lambda: pitch.pitch_report(items), args.repeats, "cpu")
                report("report", name, r, args.notes / r["seconds"], "notes/s",
                       baseline="one process" if pool_from == 1 else None)
        finally:
            pitch.POOL_MIN_NOTES = smallest_pool


def small_codec(kbps: float, device: str) -> data.Codec:
    """The codec trained here (codec.py, small size; untrained weights cost the same) at kbps, for decoding."""
    import codec as C
    from codec_kinds import Codec
    torch.manual_seed(0)
    return Codec(C.make_codec(C.CodecConfig(size="small")).to(device), "trained", kbps)


def bench_patterns(args) -> None:
    """A note (125 frames, 1.67 s) with each pattern at 1.5 and 6 kbps, reference model size, random weights:
    decode steps, sampling frames/s at batch 1 and 16 (from BOS, temperature 1, level-restricted), and training
    throughput at batch 16 (train.py's CPU defaults: fast attention, bf16 autocast where the CPU has it)."""
    from tokenizer import CodecTokenizer
    frames = data.DEFAULT_FRAMES
    device = args.device
    autocast = torch.autocast(device, dtype=torch.bfloat16) if native_bf16(device) else nullcontext()
    baseline = "flatten 1.5 kbps"
    print(f"\ncodebook patterns: a note of {frames} frames, reference model size (dim 256, depth 6, 4 heads)")
    codecs = {kbps: small_codec(kbps, device) for kbps in {kbps for _, kbps in PATTERN_ROWS}}
    for pattern, kbps in PATTERN_ROWS:
        tok = CodecTokenizer(levels=data.BANDWIDTH_LEVELS[kbps], pattern=pattern)
        length = tok.prefix + tok.steps(frames)
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=length - 1, dim=REFERENCE["dim"],
                              depth=REFERENCE["depth"], heads=REFERENCE["heads"], streams=tok.streams)).to(device)
        name = f"{pattern} {kbps:g} kbps"
        print(f" {name}: {tok.steps(frames)} decode steps per note, {length - 1} positions")
        allowed = tok.allowed(length, device)
        model.eval().set_attention("fused")
        for batch in args.pattern_batches:
            prompt = tok.start(batch, device=device)
            repeats = args.repeats if tok.steps(frames) * batch <= 4000 else 1   # flatten at 6 kbps: 1,000 steps
            # at batch 1, every weight format, with its floor and the wait for the first 100 ms of sound
            for kind in weight_formats(device) if batch == 1 else ["float32"]:
                sampler = model if kind == "float32" else quantize_weights(model, kind)
                sampler.set_attention("fused")
                r = timed(lambda: sampler.generate(prompt, length - tok.prefix, allowed=allowed), repeats, device)
                floor = matmul_floor(sampler, batch, device, args.repeats)["seconds"] * (length - tok.prefix)
                extra = dict(floor_share=floor / r["seconds"])
                if batch == 1:
                    extra["first_100ms_s"] = statistics.median(
                        first_sound(sampler, tok, codecs[kbps], prompt, allowed=allowed) for _ in range(args.repeats))
                report(f"patterns sample b{batch}", name + ("" if kind == "float32" else f", {kind} weights"), r,
                       batch * frames / r["seconds"], "frames/s", baseline, decode_steps=float(tok.steps(frames)),
                       realtime_factor=batch * frames / data.FRAME_RATE / r["seconds"], **extra)
        model.train().set_attention("fused" if device == "cuda" else "fast")
        batch = 16
        tokens = tok.encode(torch.randint(0, 1024, (batch, tok.levels, frames), device=device))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

        def step():
            with autocast:
                logits = model(tokens[..., :-1])
            loss = F.cross_entropy(logits.float().flatten(0, -2), tokens[..., 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        r = timed(step, args.repeats if tok.steps(frames) <= 500 else 1, device)
        report("patterns train b16", name, r, batch * frames / r["seconds"], "frames/s", baseline,
               decode_steps=float(tok.steps(frames)), codes_per_s=batch * frames * tok.levels / r["seconds"])
        del model, opt
    rows = {(r["section"], r["name"]): r for r in ROWS}
    xt = rows.get(("sample b1", "x-transformers generate(cache_kv=True)"))
    delay = rows.get(("patterns sample b1", "delay 1.5 kbps"))
    if xt and delay:  # the same note (125 frames at 1.5 kbps) from BOS at batch 1, in this run
        print(f"  delay 1.5 kbps samples a note {xt['seconds'] / delay['seconds']:.2f}x as fast as x-transformers' "
              "cached generate (flatten, 250 steps)")


# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--only", default=None,
                   help="comma-separated parts to run, from: sample, train, encode, patterns, guard, codec, report, "
                        "weights, sizes (default: all but weights, which needs a trained --ckpt, and sizes, 1.5 GB of "
                        "models; with --quick also not patterns and report)")
    p.add_argument("--quick", action="store_true",
                   help="the GPU check's short run (.ci/gpu; under 3 minutes on one H100): sampling at batch 1 and "
                        "256 without the naive loop, training at batch 125 (and dim 512 / depth 12 at 32) with the "
                        "rows the H100 targets compare, 128 notes encoded, 2 timed runs per row. On a CPU (.ci/gpu "
                        "--cpu, a test of the script) 32 tokens at batches 1 and 4, a tiny model at batch 4, 4 notes, "
                        "1 timed run per row")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row, the median is reported (default: "
                                                             "3; with --quick 2, 1 on a CPU)")
    p.add_argument("--sample-tokens", type=int, default=None,
                   help=f"tokens sampled per note (default: {SAMPLE_TOKENS}, the reference's; 32 with --quick on a "
                        "CPU)")
    p.add_argument("--batches", default=None, help="sampling batch sizes (default: 1,16,64; on CUDA 1,16,64,256)")
    p.add_argument("--naive-max-batch", type=int, default=None,
                   help="largest batch for the naive loop, which takes minutes at batch 64 on a CPU (default: 16; "
                        "0 = off with --quick)")
    p.add_argument("--train-batches", default=None, help="training batch sizes (default: 16,125; 125 is the "
                                                         "reference's)")
    p.add_argument("--notes", type=int, default=None, help="synthetic notes to encode (default: 64)")
    p.add_argument("--pattern-batches", default="1,16", help="sampling batch sizes of the pattern rows")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd decoding and training steps on CPU (on by default on CUDA, where "
                        "decoding is a CUDA graph)")
    p.add_argument("--ckpt", default="out/best.pt", help="the trained checkpoint of --only weights (default: "
                                                          "out/best.pt; its data folder, relative to here)")
    p.add_argument("--weights-notes", type=int, default=200, help="held-out notes --only weights scores (default: 200)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", metavar="FILE", help="write all rows and the machine description to FILE")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    cuda = args.device == "cuda"
    quick = {"repeats": 2 if cuda else 1, "batches": "1,256" if cuda else "1,4", "naive_max_batch": 0,
             "sample_tokens": SAMPLE_TOKENS if cuda else 32, "train_batches": "125" if cuda else "4",
             "notes": 128 if cuda else 4, "only": "sample,train,encode,guard,codec"}
    usual = {"repeats": 3, "batches": "1,16,64,256" if cuda else "1,16,64", "naive_max_batch": 16,
             "sample_tokens": SAMPLE_TOKENS, "train_batches": "16,125", "notes": 64,
             "only": "sample,train,encode,patterns,guard,codec,report"}
    for name, value in (quick if args.quick else usual).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    parts = set(args.only.split(","))
    known = {"sample", "train", "encode", "patterns", "guard", "codec", "report", "weights", "sizes"}
    if not parts <= known:
        p.error(f"--only: unknown parts {sorted(parts - known)}")
    args.parts = parts
    if args.notes < 1:
        p.error("--notes must be at least 1")
    if not 0 < args.sample_tokens <= REFERENCE["max_seq_len"]:
        p.error(f"--sample-tokens must be in 1..{REFERENCE['max_seq_len']}")
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
        args.train_batches = [int(b) for b in args.train_batches.split(",")]
        args.pattern_batches = [int(b) for b in args.pattern_batches.split(",")]
    except ValueError:
        p.error("--batches, --train-batches and --pattern-batches take comma-separated integers")
    return args


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = f"{names[0]} x {len(names)}" if names else cpu
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device, "cpu": cpu,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)  # on for every float32 row (main)
    return info


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = machine(args.device)
    print("codecgpt bench: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if args.json:
        global SAVE_ROWS
        SAVE_ROWS = lambda: write_json(args.json, info)  # noqa: E731
    t0 = time.time()
    # --quick puts the slowest part (compiling two training steps) last: under a time limit it is the one cut short
    order = (("encode", "sample", "guard", "codec", "train") if args.quick
             else ("sample", "train", "guard", "encode", "patterns", "codec", "report", "weights", "sizes"))
    parts = {"sample": bench_sampling, "train": bench_training, "encode": bench_encoding, "patterns": bench_patterns,
             "guard": bench_guard, "codec": bench_codec, "report": bench_report, "weights": bench_weights,
             "sizes": bench_sizes}
    for part in order:
        if part in args.parts:
            parts[part](args)
    print(f"\nbench finished in {time.time() - t0:.0f} s")
    if args.json:
        write_json(args.json, info, seconds=round(time.time() - t0, 1))
        print(f"wrote {args.json}")


def write_json(path: str, info: dict, **extra) -> None:
    """The machine and every row so far, replacing the file at once (a run killed mid-write keeps the last one)."""
    text = json.dumps({"machine": info, **extra, "rows": ROWS}, indent=1,
                      default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    atomic_write(path, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    sys.exit(main())
