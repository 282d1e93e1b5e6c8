"""The CUDA paths on a GPU: fused (flash) attention, bf16 autocast, CUDA-graph decoding, train.py and sample.py with
--device cuda, encoding on the GPU, torchrun over NCCL.

Every test here is marked `cuda` and skips where torch.cuda.is_available() is False, so the CPU suite is unchanged;
on a GPU run them with `python -m pytest -m cuda` (.ci/gpu runs them, then the GPU bench). x-transformers and the
other packages are imported where they are used, so that a GPU machine without them fails these tests instead of
skipping them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import codec_kinds
import data
from checkpoint import load_checkpoint
from conftest import ROOT, TINY, read_log, run
from model import GPT, CompiledDecoder, GPTConfig, StaticDecoder, StaticKVCache, quantize_weights

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                        "run `pytest -m cuda` on one, as .ci/gpu does")]

ATTENTION = ["explicit", "fast", "fused"]
assert TINY[-2:] == ["--device", "cpu"]
CUDA_TINY = [*TINY[:-1], "cuda"]   # the CPU end-to-end flags (synthetic notes, untrained codec, tiny model) on CUDA

# Under bf16 autocast our logits may differ from x-transformers' float32 ones by at most this relative (L2) error,
# and by at most twice what x-transformers' own forward under the same autocast differs (the CPU measured 0.4%
# for both at the reference config).
BF16_RELATIVE_ERROR = 0.015


@pytest.fixture
def exact_float32():
    """TF32 off while the test runs (PyTorch's default for matmuls; train.py turns it on): float32 parity tests
    compare float32 arithmetic."""
    with codec_kinds.exact_float32():
        yield


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def reference_gpt(**kw) -> GPT:
    """The reference size (dim 256, depth 6, 4 heads of 64) on the GPU, with our 2,311-token vocabulary."""
    cfg = dict(vocab_size=2311, max_seq_len=253)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).cuda()


# ----------------------------------------------------------------------------------------------------
# The model on CUDA: x-transformers parity, bf16 autocast, the flash and memory-efficient kernels

@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("name", ["reference", "d128_h2_dh32"])
def test_logits_match_x_transformers_on_cuda(name, attention, exact_float32):
    """On CUDA in float32, after from_x_transformers our logits equal x-transformers' within 1e-4 (+ 1e-4 relative),
    on every attention path; under bf16 autocast within BF16_RELATIVE_ERROR of its float32 logits, and within twice
    the error of x-transformers' own bf16 forward."""
    from test_model import build_xt
    torch.manual_seed(0)
    net, heads, dim_head, max_len, batch = build_xt(name)
    model = GPT.from_x_transformers(net.state_dict(), heads=heads, dim_head=dim_head, max_seq_len=max_len)
    net, model = net.cuda().eval(), model.cuda().eval()
    model.set_attention(attention)
    idx = torch.randint(0, net.num_tokens, (batch, max_len), device="cuda")
    with torch.no_grad():
        want = net(idx)
        got = model(idx)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got_bf16 = model(idx)
            theirs_bf16 = net(idx)
    assert got_bf16.dtype == torch.bfloat16   # autocast really ran the matmuls in bf16
    ours, theirs = relative_error(got_bf16, want), relative_error(theirs_bf16, want)
    print(f"\n{name} {attention}: float32 max |diff| {(got - want).abs().max().item():.1e}; bf16 relative error "
          f"{ours:.4f} (x-transformers' own bf16: {theirs:.4f})")
    assert ours <= BF16_RELATIVE_ERROR
    assert ours <= 2 * theirs + 1e-3


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_fused_attention_runs_the_flash_and_memory_efficient_kernels(backend, exact_float32):
    """With scaled_dot_product_attention restricted to one kernel (sdpa_kernel raises when that kernel cannot run),
    the fused path trains (forward with dropout, backward) and decodes on it, and gives the math kernel's logits.
    Flash under bf16 autocast (train.py's CUDA default; flash has no float32 kernel, and no attention mask, so the
    masked static-shape decode step is left to the memory-efficient kernel); memory-efficient in float32 too (the
    dtype sample.py decodes in)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernel = getattr(SDPBackend, backend)
    torch.manual_seed(1)
    model = reference_gpt()
    model.set_attention("fused")
    idx = torch.randint(0, 2311, (4, 253), device="cuda")
    dtypes = [torch.bfloat16] if backend == "FLASH_ATTENTION" else [torch.bfloat16, torch.float32]
    for dtype in dtypes:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        model.train()
        with sdpa_kernel(kernel), autocast:
            logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
        model.zero_grad(set_to_none=True)

        model.eval()
        with torch.no_grad(), autocast:
            with sdpa_kernel(kernel):
                fused = model(idx)
            with sdpa_kernel(SDPBackend.MATH):
                math = model(idx)
        # (float32: 2e-3 leaves room for a kernel that multiplies in TF32 inside; a wrong mask or scale is O(1))
        assert relative_error(fused, math) <= (1e-2 if dtype == torch.bfloat16 else 2e-3), dtype

        with torch.inference_mode(), autocast, sdpa_kernel(kernel):
            caches = model.new_caches(4, 253, torch.bfloat16 if dtype == torch.bfloat16 else None)
            model.prefill(idx[:, :8], caches)                          # causal, as many queries as keys
            step = model.decode_one_token(idx[:, 8], 8, caches)        # one query, no mask
            if backend == "EFFICIENT_ATTENTION":                       # the whole cache with a mask
                static_caches = [StaticKVCache(cache) for cache in caches]
                step_static = StaticDecoder(model).step(idx[:, 9], torch.tensor([9], device="cuda"), static_caches)
                assert step_static.isfinite().all()
        assert relative_error(step, math[:, 8]) <= (2e-2 if dtype == torch.bfloat16 else 2e-3), dtype


# ----------------------------------------------------------------------------------------------------
# Decoding on CUDA: the cache, and the CUDA graph

@pytest.mark.parametrize("attention", ATTENTION)
def test_cached_decoding_matches_uncached_on_cuda(attention, exact_float32):
    """On CUDA, prefill + one token at a time against the cache (GPT's and StaticDecoder's) gives the uncached
    forward's logits, and greedy and seeded sampled generation give the same tokens with and without the cache."""
    from test_model import small_gpt
    torch.manual_seed(2)
    model = small_gpt(attention).cuda()
    L = model.cfg.max_seq_len
    idx = torch.randint(0, model.cfg.vocab_size, (2, L), device="cuda")
    with torch.no_grad():
        full = model(idx)
        for decoder in (model, StaticDecoder(model)):
            caches = decoder.new_caches(2, L)
            torch.testing.assert_close(model.prefill(idx[:, :5], caches), full[:, 4], atol=1e-4, rtol=0)
            for pos in range(5, L):
                torch.testing.assert_close(decoder.decode_one_token(idx[:, pos], pos, caches), full[:, pos],
                                           atol=1e-4, rtol=0, msg=f"{type(decoder).__name__} position {pos}")
    prompt = idx[:, :3]
    n_new = L - 3 + 1
    for temperature in (0.0, 1.0):
        runs = [model.generate(prompt, n_new, temperature=temperature, use_kv_cache=cache,
                               generator=torch.Generator("cuda").manual_seed(3)) for cache in (True, False)]
        assert torch.equal(runs[0], runs[1]), temperature
        assert torch.equal(runs[0][:, :3], prompt)


class GraphCounts:
    """Counts CUDA-graph recordings and replays of torch.compile(mode="reduce-overhead") (its CUDA graph trees)."""

    def __init__(self, monkeypatch):
        from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
        self.recorded = self.replayed = 0
        record, execute = CUDAGraphTreeManager.record_function, CUDAGraphTreeManager.execute_node

        def counting_record(manager, *args, **kwargs):
            self.recorded += 1
            return record(manager, *args, **kwargs)

        def counting_execute(manager, *args, **kwargs):
            self.replayed += 1
            return execute(manager, *args, **kwargs)

        monkeypatch.setattr(CUDAGraphTreeManager, "record_function", counting_record)
        monkeypatch.setattr(CUDAGraphTreeManager, "execute_node", counting_execute)


def test_compiled_decode_is_a_cuda_graph_that_gives_the_eager_tokens_and_replays(monkeypatch, exact_float32):
    """CompiledDecoder with mode="reduce-overhead" (as sample.py --compile runs it on CUDA) samples exactly
    the eager tokens for a seeded run, greedy and at temperature 1 (the reference width and 2 layers: the mechanism,
    at a compile time that fits the check; the bench compiles the reference size). The first generate records a
    CUDA graph; a second generate of the same shape records none, replays one for every token after the first few,
    and compiles nothing new."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    graphs = GraphCounts(monkeypatch)
    torch.manual_seed(4)
    model = reference_gpt(depth=2).eval()
    model.set_attention("fused")
    decoder = CompiledDecoder(model, mode="reduce-overhead")
    prompt = torch.randint(0, 2311, (4, 4), device="cuda")
    new = 60

    def generate(temperature, **kw):
        return model.generate(prompt, new, temperature=temperature, generator=torch.Generator("cuda").manual_seed(5),
                              **kw)

    for temperature in (0.0, 1.0):
        eager = generate(temperature)
        first = generate(temperature, decoder=decoder)
        assert torch.equal(first, eager), temperature
    assert graphs.recorded >= 1, "no CUDA graph was recorded: reduce-overhead fell back to running without one"
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    compiled_graphs = counters["stats"]["unique_graphs"]

    recorded, replayed = graphs.recorded, graphs.replayed
    again = generate(1.0, decoder=decoder)
    assert torch.equal(again, eager)
    assert graphs.recorded == recorded, "the second generate of the same shape recorded the CUDA graph again"
    assert graphs.replayed - replayed >= new - 3, (graphs.replayed - replayed, new)
    assert counters["stats"]["unique_graphs"] == compiled_graphs, "the second generate compiled again"
    print(f"\nCUDA graphs: {recorded} recorded over the first generates; the second one replayed "
          f"{graphs.replayed - replayed} times for {new - 1} decode steps")


# ----------------------------------------------------------------------------------------------------
# train.py and sample.py with --device cuda

@pytest.fixture(scope="module")
def cuda_data_dir(tmp_path_factory) -> Path:
    """One data folder for every run here: the first makes the notes, fits the codec and encodes; the rest reuse."""
    return tmp_path_factory.mktemp("cuda-data")


def cuda_train(work: Path, *flags: str) -> subprocess.CompletedProcess:
    result = run("train.py", *CUDA_TINY, *flags, cwd=work, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, cuda_data_dir):
    """40 steps of train.py --device cuda (bf16, fused attention, eager): (work folder, out folder, process)."""
    work = tmp_path_factory.mktemp("cuda-train")
    result = cuda_train(work, "--data-dir", str(cuda_data_dir), "--max-iters", "40", "--out-dir", "out")
    return work, work / "out", result


CPU_ONLY_LOAD = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from checkpoint import load_checkpoint, model_from_checkpoint
assert not torch.cuda.is_available()
raw = torch.load(sys.argv[1], weights_only=True, map_location="cpu")
model = model_from_checkpoint(load_checkpoint(sys.argv[1]))
idx = torch.zeros(1, 8, dtype=torch.long)
assert model(idx).isfinite().all()
print("loaded on cpu:", model.num_params(), "parameters;", next(model.parameters()).device, raw["iter_num"])
"""


def check_cuda_training(work: Path, out: Path, first: subprocess.CompletedProcess, flags: list[str]) -> None:
    """The loss fell, the checkpoint loads in a process that sees no GPU, and --resume continues to 60 steps."""
    assert "cuda, bfloat16, fused attention" in first.stdout, first.stdout[-2000:]
    log = read_log(out)
    assert [e["iter"] for e in log] == [0, 20, 40]
    assert log[0]["val_loss"] > 7.0                                   # chance: ln 2311 = 7.7
    assert log[-1]["train_loss"] < log[1]["train_loss"] < log[0]["val_loss"] - 1.0
    assert min(e["val_loss"] for e in log[1:]) < log[0]["val_loss"] - 0.5

    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for name in ("ckpt.pt", "best.pt"):
        check = subprocess.run([sys.executable, "-c", CPU_ONLY_LOAD, str(out / name), str(ROOT)], env=cpu_only,
                               capture_output=True, text=True, timeout=120)
        assert check.returncode == 0 and "loaded on cpu" in check.stdout, check.stderr[-2000:]
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 40

    resumed = cuda_train(work, *flags, "--max-iters", "60", "--out-dir", str(out), "--resume")
    assert f"resuming from {out / 'ckpt.pt'} at iteration 40" in resumed.stdout
    log = read_log(out)
    assert [e["iter"] for e in log] == [0, 20, 40, 60]
    # steps 40-60 start from the trained weights: a fresh start would lose the 0-20 steps' progress
    assert log[3]["train_loss"] < log[1]["train_loss"]
    assert log[3]["val_loss"] < log[0]["val_loss"] - 0.5


@pytest.mark.parametrize("kind", ["int8", "bfloat16"])
def test_quantized_weights_on_cuda_pick_float32s_tokens_eager_and_as_a_cuda_graph(kind, exact_float32):
    """int8 (gpt-fast's CUDA path: the weight converted in the product) and bfloat16 weights on the GPU: the most
    likely next token is float32's on at least 90% of positions of random sequences, and generate through a CUDA
    graph (CompiledDecoder, reduce-overhead) greedily picks the tokens the eager quantized model scores highest
    (teacher-forced on the graph's own sequence: near-ties may flip, so at least 90% of them)."""
    torch.manual_seed(0)
    model = reference_gpt().eval()
    quantized = quantize_weights(model, kind)
    seqs = torch.randint(0, 2311, (4, 200), device="cuda")
    with torch.inference_mode():
        agree = (model(seqs).argmax(-1) == quantized(seqs).argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"{kind}: {agree:.1%}"
    prompt = seqs[:, :4]
    graph = quantized.generate(prompt, 40, temperature=0, decoder=CompiledDecoder(quantized, mode="reduce-overhead"))
    with torch.inference_mode():
        eager = quantized(graph[:, :-1]).argmax(-1)[:, 3:]
    assert (eager == graph[:, 4:]).float().mean().item() >= 0.9


def test_train_on_cuda_loss_falls_checkpoint_loads_on_cpu_and_resumes(cuda_run, cuda_data_dir, tmp_path):
    """train.py --device cuda (bf16 autocast, fused attention, fused AdamW) for 40 steps, then --resume to 60."""
    work, out, first = cuda_run
    resumed_out = tmp_path / "out"       # a copy, so that the sampling tests keep the 40-step checkpoint
    resumed_out.mkdir()
    for name in ("ckpt.pt", "best.pt", "log.jsonl"):
        (resumed_out / name).write_bytes((out / name).read_bytes())
    check_cuda_training(work, resumed_out, first, ["--data-dir", str(cuda_data_dir)])


def test_train_on_cuda_with_compile(cuda_data_dir, tmp_path):
    """The same with --compile (torch.compile of the training step; the evaluations run the uncompiled model)."""
    flags = ["--data-dir", str(cuda_data_dir), "--compile"]
    first = cuda_train(tmp_path, *flags, "--max-iters", "40", "--out-dir", "out")
    check_cuda_training(tmp_path, tmp_path / "out", first, flags)
    state = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model"]
    assert not any(key.startswith(("_orig_mod.", "module.")) for key in state)


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_sample_on_cuda_compiled_writes_wavs(cuda_run, guided, tmp_path):
    """sample.py --device cuda --compile (CUDA-graph decoding) writes 24 kHz WAVs of the trained length (30 frames),
    plain (8 notes in 2 batches of 4: the second batch replays the graph) and guided (--pitch, --cfg 3: each step
    runs the 2 conditional and 2 unconditional rows as one batch of 4, so the second run reuses the first one's
    compiled kernels)."""
    work, out, _ = cuda_run
    flags = (["--pitch", "60,64", "--cfg", "3", "--batch-size", "2"] if guided
             else ["--num-samples", "8", "--batch-size", "4", "--cfg", "1"])
    result = run("sample.py", "--ckpt", str(out / "best.pt"), "--device", "cuda", "--compile", *flags,
                        "--out-dir", str(tmp_path / "s"), cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    want = ["sample_pitch60.wav", "sample_pitch64.wav"] if guided else [f"sample_{i}.wav" for i in range(8)]
    wavs = sorted((tmp_path / "s").glob("*.wav"))
    assert [w.name for w in wavs] == want
    for w in wavs:
        info = sf.info(w)
        assert (info.samplerate, info.channels, info.frames) == (24_000, 1, 30 * 320)
        assert np.isfinite(sf.read(w)[0]).all()
    assert "tokens/s" in result.stdout and ("x2 with guidance" in result.stdout) == guided


# ----------------------------------------------------------------------------------------------------
# Encoding on the GPU

# The untrained codec's code for a frame is the nearest of its fitted codebook rows, and for its latents that choice
# is decided by float32 rounding in a share of the frames: on the CPU, encodec's float32 codes equal the exact
# (float64) nearest row for only 85% of the level-0 codes, and a relative change of 1e-6 in the latents (the size
# of the difference between cuDNN's and the CPU's float32 convolutions) changes 13% of them (docs/gpu.md).
# So the GPU must agree on at least this share of the codes at every level, and (the stricter check) every code
# it picks must be a nearest row up to float32 rounding (NEAREST_SLACK): TF32 would miss that by 20x.
CODE_AGREEMENT = 0.75
NEAREST_SLACK = 1e-5   # squared distance above the nearest row's, relative to |latent|^2 + |row|^2 (float32: 5e-7)


def nearest_excess(latents: torch.Tensor, codes: np.ndarray, codebooks: torch.Tensor) -> list[float]:
    """For each level, the largest excess of the chosen row's squared distance over the nearest row's, relative
    to |latent|^2 + |row|^2, computed in float64. latents (B, dim, frames); codes (B, levels, frames)."""
    x = latents.transpose(1, 2).reshape(-1, latents.shape[1]).double().cpu()
    excess = []
    for level, book in enumerate(codebooks.double()):
        chosen = torch.from_numpy(codes[:, level].astype(np.int64)).reshape(-1)
        dist = torch.cdist(x, book) ** 2
        extra = dist.gather(1, chosen[:, None])[:, 0] - dist.min(dim=1).values
        excess.append((extra / ((x ** 2).sum(1) + (book[chosen] ** 2).sum(1))).max().item())
        x = x - book[chosen]          # the next level quantizes what this one left over
    return excess


def test_encoding_on_cuda_gives_the_cpu_codes(fitted_codec, synthetic_folder):
    """encode_files with the codec on the GPU (batches of 64), with TF32 on as train.py sets it, agrees with the CPU
    on at least CODE_AGREEMENT of the codes at every level, and picks a nearest codebook row for every frame."""
    files = data.find_audio(synthetic_folder)
    frames = data.FRAME_RATE                       # the fixture's notes are 1 s long
    cpu = data.encode_files(files, fitted_codec, frames)
    gpu_codec = codec_kinds.load_codec(fitted_codec.identity()).to("cuda")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # as train.py runs
    try:
        gpu = data.encode_files(files, gpu_codec, frames)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    assert gpu.files == cpu.files and gpu.codes.shape == cpu.codes.shape == (len(files), 2, frames)
    share = (gpu.codes == cpu.codes).mean(axis=(0, 2))
    audio = torch.from_numpy(np.stack([data.read_audio(f, frames * data.HOP) for f in files]))
    with torch.inference_mode(), codec_kinds.exact_float32():
        latents = gpu_codec.model.encoder(audio[:, None].cuda())
    excess = nearest_excess(latents, gpu.codes, fitted_codec.codebooks())
    print(f"\ncodes equal on CUDA and CPU: {', '.join(f'{s:.1%}' for s in share)} (levels 0, 1); largest excess over "
          f"the nearest row: {', '.join(f'{e:.1e}' for e in excess)}")
    assert (share >= CODE_AGREEMENT).all(), share
    assert max(excess) <= NEAREST_SLACK, excess


# ----------------------------------------------------------------------------------------------------
# torchrun

def test_torchrun_one_process_on_cuda_goes_through_nccl_and_trains(cuda_data_dir, tmp_path):
    """torchrun --nproc_per_node=1 train.py --device cuda sets up the NCCL process group and DDP, trains (the loss
    falls), writes its checkpoint without DDP's "module." prefix, and ends cleanly."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                             str(ROOT / "train.py"), *CUDA_TINY, "--data-dir", str(cuda_data_dir),
                             "--max-iters", "40", "--out-dir", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "DDP over nccl: 1 process x 1 micro-steps of 16 notes" in result.stdout, result.stdout[-2000:]
    log = read_log(out)
    assert [e["iter"] for e in log] == [0, 20, 40]
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.5
    state = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert not any(key.startswith("module.") for key in state)


def test_non_finite_step_guard_never_waits_for_the_gpu():
    """long_run.NonFiniteSteps on CUDA: a finite and a NaN step through the check and fused AdamW run with
    torch.cuda.set_sync_debug_mode("error"), which raises on any host-device synchronisation; the NaN step leaves
    the weights as they were."""
    import long_run
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    guard = long_run.NonFiniteSteps(opt, "cuda", advice="")
    x = torch.randn(8, 64, device="cuda")
    for scale in (1.0, float("nan")):
        loss = net(x).pow(2).mean() * scale
        loss.backward()
        before = net.weight.detach().clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            guard.check(loss, norm, 0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(net.weight, before) != (scale == 1.0)
    assert guard.take_skipped() == 1
