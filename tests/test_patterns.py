"""The delay and parallel patterns end to end: the multi-stream model, its cache, what each prediction may see, and
train.py / sample.py with --pattern and --bandwidth."""

import numpy as np
import pytest
import soundfile as sf
import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import FAST, read_log, run
from model import GPT, CompiledDecoder, GPTConfig, StaticDecoder
from data import CODEBOOK_SIZE
from tokenizer import CodecTokenizer

MULTI = ["delay", "parallel"]


def multistream(pattern: str, levels: int = 4, frames: int = 9, attention: str = "fast", seed: int = 0):
    """A random multi-stream model sized for `frames` frames of the pattern, its tokenizer, and encoded codes."""
    torch.manual_seed(seed)
    tok = CodecTokenizer(levels=levels, pattern=pattern, conditions=True)
    codes = torch.randint(0, CODEBOOK_SIZE, (2, levels, frames))
    tokens = tok.encode(codes, pitch=torch.tensor([50, 70]), velocity=100, source=0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=tokens.shape[-1], dim=64, depth=2, heads=2,
                          dim_head=32, dropout=0.0, streams=tok.streams))
    model.set_attention(attention)
    return model.eval(), tok, tokens


@pytest.mark.parametrize("pattern", MULTI)
def test_multistream_logits_have_one_row_per_stream(pattern):
    """(B, K, T) tokens -> (B, K, T, vocab) logits; each stream has its own embedding table and output layer."""
    model, tok, tokens = multistream(pattern)
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (*tokens.shape, tok.vocab_size)
    assert model.embed.weight.shape[0] == tok.streams * tok.vocab_size
    # the same id in two streams is two different embeddings: swapping streams 0 and 1 changes the logits
    with torch.no_grad():
        swapped = model(tokens[:, [1, 0, 2, 3]])
    assert (swapped - logits).abs().max() > 1e-4


@pytest.mark.parametrize("attention", ["explicit", "fast", "fused"])
@pytest.mark.parametrize("pattern", MULTI)
def test_cached_decoding_matches_uncached(pattern, attention):
    """prefill + one step at a time against the KV cache gives the full forward's logits, for every stream, with
    GPT's cache (sliced to the filled prefix) and StaticDecoder's (the static shapes of compiled decoding)."""
    model, tok, tokens = multistream(pattern, attention=attention, seed=1)
    with torch.no_grad():
        full = model(tokens)
        for decoder in (model, StaticDecoder(model)):
            caches = decoder.new_caches(2, tokens.shape[-1])
            torch.testing.assert_close(model.prefill(tokens[..., :5], caches), full[:, :, 4], atol=1e-5, rtol=0)
            for pos in range(5, tokens.shape[-1]):
                step = decoder.decode_one_token(tokens[..., pos], pos, caches)
                torch.testing.assert_close(step, full[:, :, pos], atol=1e-5, rtol=0, msg=f"position {pos}")


@pytest.mark.parametrize("pattern", MULTI)
def test_generate_with_and_without_cache_agree_and_obey_the_pattern(pattern):
    """Seeded sampling (and greedy) gives the same streams with and without the cache; every sampled token is
    allowed (a code of its level, EMPTY in the delay's holes), so the streams decode to codes."""
    model, tok, tokens = multistream(pattern, seed=2)
    prompt = tok.start(3, pitch=torch.tensor([40, 60, 80]))
    length = tokens.shape[-1]
    allowed = tok.allowed(length)
    for kw in (dict(temperature=1.0, top_k=50), dict(temperature=0.7, top_p=0.9), dict(temperature=0)):
        a = model.generate(prompt, length - tok.prefix, allowed=allowed, generator=torch.Generator().manual_seed(3),
                           **kw)
        b = model.generate(prompt, length - tok.prefix, allowed=allowed, use_kv_cache=False,
                           generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(a, b) and a.shape == (3, tok.levels, length)
        assert torch.equal(a[..., :tok.prefix], prompt)
        rules = allowed[tok.prefix:].transpose(0, 1).expand(3, -1, -1, -1)      # (B, levels, steps, vocab)
        assert rules.gather(-1, a[..., tok.prefix:, None]).all()
        assert tok.decode(a).shape == (3, tok.levels, tok.frames(length - tok.prefix))
        if pattern == "delay":
            assert (a[:, 1, tok.prefix] == tok.empty).all() and (a[:, 0, -1] == tok.empty).all()


def test_delay_predictions_see_only_what_the_pattern_allows():
    """In the delay pattern the code of level k, frame t sits at step t + k, and every stream's prediction of step s
    is made at position P + s - 1. Changing code (k, t) must leave every stream's predictions of steps up to t + k
    exactly as they were, and move every stream's predictions of later steps. So a code sees the lower levels of its
    own frame (b0 after a0) and later frames of lower levels (c0 after a1), but not the higher levels of its own or
    an earlier frame (a1 without b0)."""
    model, tok, tokens = multistream("delay", levels=3, frames=6, seed=4)
    K, T, P = tok.levels, 6, tok.prefix
    with torch.no_grad():
        base = model(tokens[..., :-1])                            # (B, streams, positions, vocab)
        for k in range(K):
            for t in range(T):
                step = t + k                                      # where code (k, t) sits, after the prefix
                changed = tokens.clone()
                changed[:, k, P + step] = (changed[:, k, P + step] + 1) % CODEBOOK_SIZE
                moved = (model(changed[..., :-1]) - base).abs().amax(dim=(0, 3))   # (streams, positions)
                for stream in range(K):                           # each stream on its own, not their maximum
                    assert moved[stream, :P + step].max() == 0, (k, t, stream)
                    assert (moved[stream, P + step:] > 0).all(), (k, t, stream)
    # in particular level 1 of frame 0 (step 1) is predicted after level 0 of frame 0 (step 0) is known
    changed = tokens.clone()
    changed[:, 0, P] = (changed[:, 0, P] + 1) % CODEBOOK_SIZE
    with torch.no_grad():
        assert (model(changed[..., :-1])[:, 1, P] - base[:, 1, P]).abs().max() > 0


def test_parallel_levels_of_one_frame_do_not_see_each_other():
    """In the parallel pattern all levels of frame t are predicted at step t: changing any code of frame t leaves
    every prediction of frame t unchanged."""
    model, tok, tokens = multistream("parallel", levels=4, frames=5, seed=5)
    P = tok.prefix
    with torch.no_grad():
        base = model(tokens[..., :-1])
        for t in range(5):
            changed = tokens.clone()
            changed[:, :, P + t] = (changed[:, :, P + t] + 7) % CODEBOOK_SIZE
            assert torch.equal(model(changed[..., :-1])[..., :P + t, :], base[..., :P + t, :])


@pytest.mark.slow
@pytest.mark.parametrize("pattern", MULTI)
def test_guidance_and_compiled_decode_work_for_multistream(pattern):
    """Guidance at scale 0 samples exactly what the unconditional prompt alone samples; the compiled decode
    samples exactly the eager tokens."""
    model, tok, tokens = multistream(pattern, seed=6)
    length = tokens.shape[-1]
    allowed = tok.allowed(length)
    prompt = tok.start(2, pitch=torch.tensor([45, 75]), velocity=100)
    uncond = tok.unconditional(prompt)
    kw = dict(temperature=0, allowed=allowed)
    guided = model.generate(prompt, length - tok.prefix, uncond_prompt=uncond, cfg_scale=0.0, **kw)
    alone = model.generate(uncond, length - tok.prefix, **kw)
    assert torch.equal(guided[..., tok.prefix:], alone[..., tok.prefix:])
    compiled = CompiledDecoder(model)
    eager = model.generate(prompt, length - tok.prefix, allowed=allowed, generator=torch.Generator().manual_seed(9))
    got = model.generate(prompt, length - tok.prefix, allowed=allowed, decoder=compiled,
                         generator=torch.Generator().manual_seed(9))
    assert torch.equal(eager, got)


@pytest.mark.parametrize("pattern", ["flatten", *MULTI])
def test_continuation_keeps_the_recordings_codes(pattern):
    """A recording's first frames, given as prompt() and allowed(given=...), come back unchanged at the start of
    the generated note, for every pattern (the delay's partly known steps included)."""
    model, tok, tokens = multistream(pattern, seed=7) if pattern != "flatten" else (None, None, None)
    if pattern == "flatten":
        torch.manual_seed(7)
        tok = CodecTokenizer(levels=4, conditions=True)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=tok.prefix + tok.steps(9), dim=64, depth=2,
                              heads=2, dim_head=32, dropout=0.0)).eval()
    recording = torch.randint(0, CODEBOOK_SIZE, (1, tok.levels, 3))
    length = tok.prefix + tok.steps(9)
    prompt = tok.prompt(2, pitch=60, codes=recording)
    out = model.generate(prompt, length - prompt.shape[-1], allowed=tok.allowed(length, given=recording[0]),
                         generator=torch.Generator().manual_seed(1))
    codes = tok.decode(out)
    assert codes.shape == (2, tok.levels, 9)
    assert (codes[:, :, :3] == recording).all()


# ----------------------------------------------------------------------------------------------------
# train.py and sample.py

PATTERN_RUN = [*FAST, "--bandwidth", "3", "--max-iters", "12", "--eval-interval", "6"]


@pytest.fixture(scope="module")
def pattern_runs(tmp_path_factory, fast_data_dir):
    """One short training run per multi-stream pattern at 3 kbps (4 codebooks): {pattern: out folder}."""
    outs = {}
    for pattern in MULTI:
        out = tmp_path_factory.mktemp(pattern) / "out"
        result = run("train.py", *PATTERN_RUN, "--pattern", pattern, "--data-dir", str(fast_data_dir),
                            "--out-dir", str(out), cwd=out.parent)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"{pattern} pattern" in result.stdout and "nats/frame" in result.stdout
        outs[pattern] = out
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("pattern", MULTI)
def test_training_logs_each_level_and_nats_per_frame(pattern_runs, pattern):
    """Every evaluation logs 4 per-level losses and val_nats_per_frame = their sum; the loss falls; the
    checkpoint records the pattern (tokenizer), the streams (model config) and the flag (args)."""
    out = pattern_runs[pattern]
    log = read_log(out)
    assert [e["iter"] for e in log] == [0, 6, 12]
    for e in log:
        assert len(e["val_loss_per_level"]) == 4
        assert e["val_nats_per_frame"] == pytest.approx(sum(e["val_loss_per_level"]))
        assert e["val_loss"] == pytest.approx(e["val_nats_per_frame"] / 4)
    assert log[-1]["val_nats_per_frame"] < log[0]["val_nats_per_frame"] - 2
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["tokenizer"]["pattern"] == pattern and ckpt["args"]["pattern"] == pattern
    assert ckpt["config"]["streams"] == 4
    # 0.2 s = 15 frames: delay needs 15 + 3 steps after the prefix, parallel 15 (minus the last, never fed back)
    assert ckpt["config"]["max_seq_len"] == 4 + (18 if pattern == "delay" else 15) - 1


@pytest.mark.slow
@pytest.mark.parametrize("pattern", MULTI)
def test_sample_takes_the_pattern_from_the_checkpoint(pattern_runs, pattern, tmp_path):
    """sample.py writes notes of the trained length with guidance and a continuation, reports frames/s, and
    refuses another --pattern and a --seconds the positions cannot hold, naming the flag."""
    ckpt = str(pattern_runs[pattern] / "best.pt")
    result = run("sample.py", "--ckpt", ckpt, "--pitch", "50,62", "--cfg", "3", "--top-k", "100",
                        "--out-dir", str(tmp_path / "a"), "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "frames/s" in result.stdout and "tokens/s" in result.stdout
    wavs = sorted((tmp_path / "a").glob("*.wav"))
    assert [w.name for w in wavs] == ["sample_pitch50.wav", "sample_pitch62.wav"]
    assert all(sf.info(w).frames == 15 * 320 for w in wavs)
    prompt = tmp_path / "prompt.wav"
    sf.write(prompt, np.sin(np.arange(24_000) * 2 * np.pi * 220 / 24_000).astype(np.float32), 24_000)
    result = run("sample.py", "--ckpt", ckpt, "--prompt", str(prompt), "--prompt-seconds", "0.1",
                        "--num-samples", "2", "--out-dir", str(tmp_path / "b"), "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "b").glob("continue_prompt_*.wav"))) == 2
    other = "parallel" if pattern == "delay" else "delay"
    for flags, flag in ((["--pattern", other], "--pattern"), (["--seconds", "1"], "--seconds")):
        result = run("sample.py", "--ckpt", ckpt, *flags, "--out-dir", str(tmp_path), "--device", "cpu",
                            cwd=tmp_path)
        assert result.returncode != 0 and flag in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,flag", [(["--pattern", "spiral"], "--pattern"), (["--bandwidth", "7"], "--bandwidth"),
                                        (["--bandwidth", "48"], "--bandwidth")])
@pytest.mark.slow
def test_train_refuses_unknown_patterns_and_bandwidths(flags, flag, tmp_path):
    result = run("train.py", *flags, "--out-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and flag in result.stderr


@pytest.mark.slow
def test_checkpoints_from_before_patterns_sample_and_resume_as_before(reference_run, fast_data_dir, tmp_path):
    """A flatten checkpoint without the new entries (tokenizer "pattern", config "streams", args "pattern"), as
    written before patterns existed, samples exactly the same WAV as the same checkpoint with them, and resumes."""
    ckpt = load_checkpoint(reference_run / "ckpt.pt")
    old = {**ckpt, "tokenizer": {k: v for k, v in ckpt["tokenizer"].items() if k != "pattern"},
           "config": {k: v for k, v in ckpt["config"].items() if k != "streams"},
           "args": {k: v for k, v in ckpt["args"].items() if k != "pattern"}}
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "ckpt.pt")       # no digest either, like a checkpoint from then
    assert model_from_checkpoint(old).cfg.streams == 1
    wavs = []
    for name, path in (("new", reference_run / "ckpt.pt"), ("old", tmp_path / "old" / "ckpt.pt")):
        result = run("sample.py", "--ckpt", str(path), "--num-samples", "2", "--seed", "3", "--device", "cpu",
                            "--out-dir", str(tmp_path / f"s-{name}"), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        wavs.append([w.read_bytes() for w in sorted((tmp_path / f"s-{name}").glob("*.wav"))])
    assert wavs[0] == wavs[1] and len(wavs[0]) == 2
    result = run("train.py", *FAST, "--data-dir", str(fast_data_dir), "--max-iters", str(old["iter_num"] + 2),
                        "--out-dir", str(tmp_path / "old"), "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_checkpoint(tmp_path / "old" / "ckpt.pt")["tokenizer"]["pattern"] == "flatten"
