"""Asking for a note: condition tokens, condition dropout, classifier-free guidance, continuation, sample.py's flags.

The tiny model trained by the session fixture `trained` (train.py on synthetic plucked strings, untrained codec)
is conditional, which is train.py's default. Audio quality cannot be judged offline; these tests check the machinery.
"""
import re

import pytest
import soundfile as sf
import torch

import data
import sample
from conftest import run
from checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
from model import GPT, GPTConfig, classifier_free_guidance
from tokenizer import NSYNTH_SOURCES, CodecTokenizer


def tokenizer():
    return CodecTokenizer(2, conditions=True)


# ----------------------------------------------------------------------------------------------------
# tokens

def test_condition_tokens_layout():
    """Pitch, velocity and source each get their own ids after BOS, with an unknown id each; codes round-trip."""
    tok = tokenizer()
    assert tok.prefix == 4 and tok.vocab_size == 2048 + 1 + 129 + 129 + 4
    cond = tok.condition_tokens(torch.tensor([60, 21]), torch.tensor([100, -1]), None, batch=2)
    assert cond.tolist() == [[2049 + 60, 2049 + 129 + 100, tok.unknown[2].item()],
                             [2049 + 21, tok.unknown[1].item(), tok.unknown[2].item()]]
    assert len(set(tok.unknown.tolist()) | set(range(2049))) == 2049 + 3          # no id is used twice
    assert tok.unknown.max().item() == tok.vocab_size - 1
    codes = torch.randint(0, 1024, (2, 2, 5))
    tokens = tok.encode(codes, torch.tensor([60, 61]), 100, 2)
    assert tokens.shape == (2, 4 + 10) and (tokens[:, 0] == tok.bos).all()
    assert torch.equal(tok.decode(tokens), codes)
    allowed = tok.allowed(tokens.shape[1])
    assert not allowed[:4].any()                                  # BOS and conditions are given, never sampled
    assert allowed[torch.arange(4, 14), tokens[0, 4:]].all()      # each code is allowed at its position


@pytest.mark.parametrize("name,kw", [("pitch", dict(pitch=128)), ("velocity", dict(velocity=-2)),
                                     ("source", dict(source=3))])
def test_condition_out_of_range_is_an_error(name, kw):
    args = dict(pitch=None, velocity=None, source=None) | kw
    with pytest.raises(ValueError, match=name):
        tokenizer().condition_tokens(**args)


def test_condition_dropout_rate_and_unconditional():
    """Each condition is replaced by its unknown id independently with probability p; codes are never touched."""
    tok = tokenizer()
    tokens = tok.encode(torch.randint(0, 1024, (20000, 2, 3)), 60, 100, 0)
    dropped = tok.drop_conditions(tokens, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(dropped[:, 4:], tokens[:, 4:]) and torch.equal(dropped[:, 0], tokens[:, 0])
    is_unknown = dropped[:, 1:4] == tok.unknown
    rates = is_unknown.float().mean(0)
    assert ((rates - 0.25).abs() < 0.02).all(), rates
    both = (is_unknown[:, 0] & is_unknown[:, 1]).float().mean()
    assert abs(both - 0.25 ** 2) < 0.01                            # independent
    assert torch.equal(tok.drop_conditions(tokens, 0.0), tokens)
    assert (tok.unconditional(tokens)[:, 1:4] == tok.unknown).all()


def test_dataset_puts_the_labels_in_the_tokens(synthetic_folder, fitted_codec):
    """Synthetic notes are named like NSynth; their pitch, velocity and source end up as the condition tokens.
    A file without NSynth labels gets unknown tokens."""
    files = data.find_audio(synthetic_folder)[:6]
    encoded = data.encode_files(files, fitted_codec, 20)
    tok = tokenizer()
    ds = data.TokenDataset(encoded, tok)
    for i, f in enumerate(ds.files):
        family, source, rest = f.stem.split("_")
        _, pitch, velocity = rest.split("-")
        pitch_first, velocity_first, source_first = tok.condition_firsts
        assert ds.tokens[i, 1:4].tolist() == [pitch_first + int(pitch), velocity_first + int(velocity),
                                              source_first + NSYNTH_SOURCES.index(source)]
    unlabelled = data.TokenDataset(data.EncodedFiles(encoded.codes, [f.with_name(f"x{i}.wav") for i, f in
                                                                     enumerate(encoded.files)], []), tok)
    assert (unlabelled.tokens[:, 1:4] == tok.unknown).all()


# ----------------------------------------------------------------------------------------------------
# the trained conditional model

@pytest.fixture(scope="module")
def conditional(trained):
    _, out, _ = trained
    ckpt = load_checkpoint(str(out / "best.pt"))
    assert ckpt["tokenizer"]["conditions"] is True               # recorded in the checkpoint
    return model_from_checkpoint(ckpt).eval(), CodecTokenizer(**ckpt["tokenizer"])


@pytest.mark.slow
def test_condition_tokens_reach_the_model(conditional):
    """Different conditions give different next-code logits; the same conditions give the same."""
    model, tok = conditional
    codes = torch.randint(0, 1024, (1, 2, 8))
    with torch.no_grad():
        a = model(tok.encode(codes, 50, 100, 0))[:, 3:]
        b = model(tok.encode(codes, 70, 100, 0))[:, 3:]
        c = model(tok.unconditional(tok.encode(codes, 50, 100, 0)))[:, 3:]
        again = model(tok.encode(codes, 50, 100, 0))[:, 3:]
    assert torch.equal(a, again)
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


@pytest.mark.slow
def test_cfg_scale_0_is_unconditional_and_1_conditional(conditional):
    """Guidance mixes the two halves of one batch: scale 0 gives the unconditional logits exactly, 1 the
    conditional ones; and generate with guidance (cached, both halves in one batch) picks the tokens that greedy
    decoding of the unconditional / conditional prompt alone picks."""
    model, tok = conditional
    prompt = tok.start(3, torch.tensor([45, 60, 75]), 100, 0)
    uncond = tok.unconditional(prompt)
    with torch.no_grad():
        logits = model(torch.cat([prompt, uncond]))[:, -1]
    cond_l, uncond_l = logits.chunk(2)
    assert torch.equal(classifier_free_guidance(logits, 0.0), uncond_l)
    torch.testing.assert_close(classifier_free_guidance(logits, 1.0), cond_l, atol=1e-5, rtol=0)
    guided = classifier_free_guidance(logits, 3.0)
    torch.testing.assert_close(guided, uncond_l + 3 * (cond_l - uncond_l))

    n = 2 * 6
    allowed = tok.allowed(4 + n)
    kw = dict(temperature=0, allowed=allowed)
    for use_kv_cache in (True, False):
        with_s0 = model.generate(prompt, n, uncond_prompt=uncond, cfg_scale=0.0, use_kv_cache=use_kv_cache, **kw)
        alone_uncond = model.generate(uncond, n, use_kv_cache=use_kv_cache, **kw)
        assert torch.equal(with_s0[:, 4:], alone_uncond[:, 4:]) and torch.equal(with_s0[:, :4], prompt)
    with_s1 = model.generate(prompt, n, uncond_prompt=uncond, cfg_scale=1.0, **kw)
    assert torch.equal(with_s1, model.generate(prompt, n, **kw))
    strong = model.generate(prompt, n, uncond_prompt=uncond, cfg_scale=3.0, **kw)
    assert allowed[torch.arange(4, 4 + n), strong[0, 4:]].all()      # guidance keeps level-restricted sampling


@pytest.mark.slow
def test_continuation_keeps_the_prompt(conditional):
    """A prompt of codes after the conditions is prefilled and kept; the continuation fills the rest."""
    model, tok = conditional
    codes = torch.randint(0, 1024, (2, 2, 5))
    prompt = tok.encode(codes, torch.tensor([50, 60]), 100, None)
    total = model.cfg.max_seq_len + 1
    out = model.generate(prompt, total - prompt.shape[1], allowed=tok.allowed(total),
                         generator=torch.Generator().manual_seed(0),
                         uncond_prompt=tok.unconditional(prompt), cfg_scale=2.0)
    assert out.shape == (2, total) and torch.equal(out[:, :prompt.shape[1]], prompt)
    assert torch.equal(tok.decode(out)[:, :, :5], codes)


# ----------------------------------------------------------------------------------------------------
# sample.py

@pytest.mark.slow
def test_sample_asks_for_pitches_and_reports(trained, tmp_path):
    """--pitch 50,62 writes one file per pitch, named after it; --report measures them and prints the summary."""
    work, out, _ = trained
    result = run("sample.py", "--ckpt", str(out / "best.pt"), "--pitch", "50,62", "--velocity", "100",
                 "--source", "acoustic", "--cfg", "2", "--report", "--out-dir", str(tmp_path), "--device", "cpu",
                 cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    for midi in (50, 62):
        audio, sr = sf.read(tmp_path / f"sample_pitch{midi}.wav")
        assert sr == 24000 and len(audio) == 30 * 320
        assert (tmp_path / f"sample_pitch{midi}.png").stat().st_size > 1000
    assert re.search(r"pitch accuracy: \d of 2 within 50 cents", result.stdout), result.stdout


@pytest.mark.slow
def test_sample_asks_for_each_source_of_a_list(trained, tmp_path, monkeypatch):
    """--source acoustic,electronic makes every pitch and velocity once per source, named after it, and each note's
    prompt holds its own source token."""
    work, out, _ = trained
    prompts = []
    generate = GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, prompt, *a, **k: prompts.append(prompt) or
                        generate(self, prompt, *a, **k))
    monkeypatch.chdir(work)
    sample.main(["--ckpt", str(out / "best.pt"), "--pitch", "50", "--velocity", "25,127", "--source",
                 "acoustic,electronic", "--out-dir", str(tmp_path), "--device", "cpu"])
    names = sorted(p.name for p in tmp_path.glob("*.wav"))
    assert names == sorted(f"sample_pitch50_vel{v}_{s}.wav" for v in (25, 127) for s in ("acoustic", "electronic"))
    tok = tokenizer_from_checkpoint(torch.load(out / "best.pt", weights_only=True))
    *notes, first_sound = prompts        # the last generate is the first-100-ms measure: one note's prompt again
    assert torch.equal(first_sound, notes[-1][:1])
    sources = torch.cat(notes)[:, 3]     # BOS, pitch, velocity, source
    expected = tok.condition_tokens(None, None, torch.tensor([0, 1, 0, 1]), 4)[:, 2]
    assert torch.equal(sources, expected)
    page = (tmp_path / "index.html").read_text()
    assert page.count("source acoustic<br>") == 2 and page.count("source electronic<br>") == 2


@pytest.mark.slow
def test_sample_continues_a_recording(trained, tmp_path, synthetic_folder):
    work, out, _ = trained
    prompt = data.find_audio(synthetic_folder)[0]
    result = run("sample.py", "--ckpt", str(out / "best.pt"), "--prompt", str(prompt), "--prompt-seconds", "0.2",
                 "--num-samples", "2", "--out-dir", str(tmp_path), "--device", "cpu", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.glob("*.wav"))
    assert names == [f"continue_{prompt.stem}_0.wav", f"continue_{prompt.stem}_1.wav"]
    assert len(sf.read(tmp_path / names[0])[0]) == 30 * 320     # prompt + continuation: the model's full length


@pytest.mark.parametrize("flags,message", [
    (["--pitch", "128"], "--pitch"), (["--pitch", "60-x"], "--pitch"), (["--velocity", "200"], "--velocity"),
    (["--source", "piano"], "--source"), (["--cfg", "-1"], "--cfg"), (["--report"], "--report"),
    (["--prompt", "missing.wav", "--prompt-seconds", "0.1"], "missing.wav"), (["--prompt-seconds", "5", "--prompt", "x.wav"], "--prompt-seconds"),
])
@pytest.mark.slow
def test_sample_rejects_bad_condition_flags(trained, tmp_path, flags, message):
    work, out, _ = trained
    result = run("sample.py", "--ckpt", str(out / "best.pt"), "--out-dir", str(tmp_path), *flags, cwd=work)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-1000:]
    assert "Traceback" not in result.stderr


def test_conditions_on_an_unconditional_model_are_refused(tmp_path):
    """A checkpoint trained --unconditional says so instead of ignoring --pitch."""
    tok = CodecTokenizer(2)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=20, dim=32, depth=1, heads=1, dim_head=32))
    codec = data.Codec.untrained(1.5, seed=0, codebooks=torch.randn(2, 1024, 128))
    torch.save({"model": model.state_dict(), "config": vars(model.cfg), "tokenizer": tok.state(),
                "codec": codec.identity()}, tmp_path / "u.pt")
    with pytest.raises(SystemExit) as stop:
        sample.main(["--ckpt", str(tmp_path / "u.pt"), "--pitch", "60", "--out-dir", str(tmp_path), "--device", "cpu"])
    assert "without conditions" in str(stop.value.code)
