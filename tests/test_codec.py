"""The trainable codec (codec.py, codec_extras.py), its trainer (train_codec.py) and its file (data.Codec.load): a
few steps on tiny data, exact resume, shapes at every bandwidth, the synthesis, the published architecture, the codec
file round trip, damaged or wrong files refused."""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

import checkpoint
import codec as C
import data
import train_codec
from codec_kinds import load_codec
from conftest import assert_one_line, read_log
from long_run import Diverged, Stopped

TINY_CODEC = ["--data", "synthetic", "--synthetic-notes", "20", "--seconds", "0.4", "--crop-frames", "16",
              "--crop-slack", "4", "--batch-size", "4", "--width", "32", "--eval-interval", "2",
              "--eval-bandwidths", "1.5", "6", "--device", "cpu"]


def train_codec_run(out_dir, data_dir, *extra):
    args = train_codec.parse_args([*TINY_CODEC, "--data-dir", str(data_dir), "--out-dir", str(out_dir), *extra])
    return train_codec.train(args)


@pytest.fixture(scope="module")
def codec_run(tmp_path_factory):
    """4 steps of the small codec on 18 synthetic notes of 0.4 s: (out folder, data folder)."""
    root = tmp_path_factory.mktemp("codec")
    train_codec_run(root / "out", root / "data", "--max-iters", "4")
    return root / "out", root / "data"


def test_a_few_steps_write_codec_file_log_and_curves(codec_run):
    out, _ = codec_run
    log = read_log(out)
    assert [e["iter"] for e in log] == [0, 2, 4]
    for entry in log:
        for bw, levels in (("bw1.5", 2), ("bw6.0", 8)):
            m = entry["bandwidths"][bw]
            assert len(m["perplexity"]) == levels and all(1 <= p <= 1024 for p in m["perplexity"])
            assert {"si_snr_db", "mel_distance", "pitch_kept", "pitch_measured"} <= set(m)
    assert (out / "codec.pt").is_file() and (out / "ckpt.pt").is_file() and (out / "curves.png").is_file()


def test_pitch_shift_moves_a_crop_and_its_teacher_f0_together():
    """--pitch-shift: each crop played faster or slower by whole semitones; its label moves as its measured pitch."""
    from data import HOP, SAMPLE_RATE
    from pitch import estimate_f0
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    notes = {"train": torch.from_numpy(np.sin(2 * np.pi * 220 * t).astype(np.float32))[None].repeat(8, 1),
             "train_f0": torch.full((8,), 220.0), "frames": 75}
    args = train_codec.parse_args(["--pitch-shift", "4", "--batch-size", "8", "--crop-frames", "40"])
    audio, f0, _ = train_codec.crops(notes, args, torch.Generator().manual_seed(0), rank=0, world=1)
    assert audio.shape == (8, 40 * HOP)
    measured = np.array([estimate_f0(a.numpy(), SAMPLE_RATE) for a in audio])
    assert np.ptp(f0.numpy()) > 50                                  # shifted by different amounts, up to 4 semitones
    assert np.all(np.abs(1200 * np.log2(measured / f0.numpy())) < 10)
    semitones = 12 * np.log2(f0.numpy() / 220)
    assert np.allclose(semitones, semitones.round(), atol=1e-4) and np.abs(semitones).max() < 4.001  # whole semitones


def test_resume_is_exact(codec_run, tmp_path):
    """4 steps in one go == 2 steps, then --resume for 2 more: the same weights and codebooks, bit for bit."""
    reference, data_dir = codec_run
    out = tmp_path / "out"
    train_codec_run(out, data_dir, "--max-iters", "2")
    train_codec_run(out, data_dir, "--max-iters", "4", "--resume")
    a = checkpoint.load_checkpoint(reference / "ckpt.pt")["model"]   # codebooks' EMA state included
    b = checkpoint.load_checkpoint(out / "ckpt.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["iter"] for e in read_log(out)] == [0, 2, 4]


def test_a_run_from_before_pitch_shift_resumes_without_it(codec_run, tmp_path):
    """A checkpoint whose args have no pitch_shift (written before the flag) resumes as the run it was: with none."""
    _, data_dir = codec_run
    out = tmp_path / "out"
    train_codec_run(out, data_dir, "--max-iters", "2", "--pitch-shift", "0")
    ckpt = checkpoint.load_checkpoint(out / "ckpt.pt")
    del ckpt["args"]["pitch_shift"]
    checkpoint.save_checkpoint(ckpt, out / "ckpt.pt")
    args = train_codec.parse_args([*TINY_CODEC, "--data-dir", str(data_dir), "--out-dir", str(out), "--max-iters",
                                   "4", "--resume"])
    train_codec.train(args)
    assert args.pitch_shift == 0 and [e["iter"] for e in read_log(out)] == [0, 2, 4]


def test_sigterm_between_evaluations_saves_that_step_and_resumes_exactly(codec_run, tmp_path, monkeypatch):
    """The codec trainer stops on SIGTERM as train.py does (long_run.py): the step in progress finishes, ckpt.pt is
    written at it (between evaluations) and the exit status is 143; --resume then ends where an uninterrupted run
    ends, bit for bit (the codec_run fixture: 4 steps in one go)."""
    reference, data_dir = codec_run
    real_loss, calls = C.codec_loss, []

    def loss_then_sigterm(model, *args, **kwargs):
        calls.append(model.training)
        if sum(calls) == 3:                      # during the third training step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(model, *args, **kwargs)
    monkeypatch.setattr(C, "codec_loss", loss_then_sigterm)
    out = tmp_path / "out"
    with pytest.raises(Stopped) as stopped:
        train_codec_run(out, data_dir, "--max-iters", "4")
    assert stopped.value.status == 143
    saved = checkpoint.load_checkpoint(out / "ckpt.pt")
    assert saved["iter_num"] == 3 and "interval" in saved                  # after step 3, not the evaluation at 2
    monkeypatch.setattr(C, "codec_loss", real_loss)
    train_codec_run(out, data_dir, "--max-iters", "4", "--resume")
    a = checkpoint.load_checkpoint(reference / "ckpt.pt")["model"]
    b = checkpoint.load_checkpoint(out / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("elapsed_s", "train_s")} for e in log]  # noqa
    assert strip(read_log(out)) == strip(read_log(reference))


def test_non_finite_steps_are_skipped_then_stop_the_codec_run(codec_run, tmp_path, monkeypatch):
    """A training loss that is NaN at every step: each step is skipped (the weights stay those of step 0) and the
    run stops with one line naming the steps and the last checkpoint with finite weights."""
    _, data_dir = codec_run
    real_loss = C.codec_loss

    def nan_in_training(model, *args, **kwargs):
        loss, parts, out = real_loss(model, *args, **kwargs)
        return (loss * math.nan if model.training else loss), parts, out
    monkeypatch.setattr(C, "codec_loss", nan_in_training)
    out = tmp_path / "out"
    with pytest.raises(Diverged) as diverged:
        train_codec_run(out, data_dir, "--max-iters", "20", "--eval-interval", "100", "--no-pitch-eval")
    assert_one_line(diverged.value, "diverged", "steps 0-4", f"{out / 'ckpt.pt'} (iteration 0)", "--lr", "0.001")
    saved = checkpoint.load_checkpoint(out / "ckpt.pt")
    assert saved["iter_num"] == 0 and all(torch.isfinite(v).all() for v in saved["model"].values())


@pytest.mark.parametrize("size", ["small", "encodec"])
def test_encode_decode_shapes_at_every_bandwidth(size):
    torch.manual_seed(0)
    model = C.make_codec(C.CodecConfig(size=size, width=32)).eval()
    audio = torch.randn(2, 25 * C.HOP) * 0.1
    for bandwidth, levels in C.BANDWIDTH_LEVELS.items():
        model.set_target_bandwidth(bandwidth)
        codes = model.encode(audio)
        assert codes.shape == (2, levels, 25) and codes.dtype == torch.long
        assert 0 <= codes.min() and codes.max() < C.CODEBOOK_SIZE
        assert model.decode(codes).shape == (2, 25 * C.HOP)


def test_training_loss_reaches_every_level_and_the_encoder():
    """codec_loss at 4 levels: commitment per level (4 values), and gradients reach the encoder and decoder."""
    torch.manual_seed(0)
    model = C.make_codec(C.CodecConfig(width=32))
    audio = torch.randn(2, 16 * C.HOP) * 0.1
    loss, parts, out = C.codec_loss(model, audio, 4, torch.tensor([110.0, float("nan")]))
    loss.backward()
    assert out.commit.shape == (4,) and out.codes.shape == (2, 4, 16)
    assert {"stft", "l1", "commit", "f0", "harmonic"} <= set(parts)
    assert model.encoder.inp.weight.grad.abs().sum() > 0
    assert model.decoder.amplitude_head.weight.grad.abs().sum() > 0
    assert model.decoder.distribution_head.weight.grad.abs().sum() > 0


def test_partials_share_the_amplitude_below_nyquist_and_keep_their_peaks_low():
    """The decoder's overall amplitude is shared out over the partials below 12 kHz (none above: they would alias),
    and partials of equal amplitude start at Schroeder's phases: peaks within 8 dB of the RMS (all starting at
    phase 0, 39 equal partials peak 15 dB above it)."""
    decoder = C.HarmonicNoiseDecoder(C.CodecConfig(width=32))
    f0 = torch.tensor([[300.0] * 20, [5000.0] * 20])
    amplitude = torch.full((2, 1, 20), 0.5)
    harmonics = decoder.harmonic_amplitudes(f0, amplitude, torch.randn(2, 64, 20))
    assert torch.allclose(harmonics.sum(1), amplitude[:, 0])
    assert (harmonics[0, 40:] == 0).all() and (harmonics[0, :39] > 0).all()   # 39 x 300 Hz < 12 kHz <= 40 x 300
    assert (harmonics[1, 2:] == 0).all() and (harmonics[1, :2] > 0).all()
    flat = torch.zeros(1, 64, 20)
    flat[:, :39] = 0.5 / 39
    audio = C.harmonic_synth(f0[:1], flat)[0, 2 * C.HOP:-2 * C.HOP]
    assert 20 * torch.log10(audio.abs().max() / audio.pow(2).mean().sqrt()) < 8


def test_filtered_noise_follows_its_envelope_and_its_seed():
    """Noise with an envelope only below 1.7 kHz (bands 0-9 of 65 from 0 to 12 kHz) has almost no energy above
    2.5 kHz; the same seed gives the same samples, another seed others."""
    envelope = torch.zeros(1, 65, 40)
    envelope[:, :10] = 1.0
    noise = C.filtered_noise(envelope, seed=1)
    assert noise.shape == (1, 40 * C.HOP)
    assert torch.equal(noise, C.filtered_noise(envelope, seed=1))
    assert not torch.equal(noise, C.filtered_noise(envelope, seed=2))
    middle = noise[0, 2 * C.HOP:-2 * C.HOP]
    power = torch.fft.rfft(middle).abs().pow(2)
    hz = torch.fft.rfftfreq(len(middle), 1 / C.SAMPLE_RATE)
    assert power[hz > 2500].sum() < 1e-3 * power.sum()


def test_published_architecture_is_encodecs_model():
    """CodecConfig(size='encodec') is EnCodec's own EncodecModel as model.net (the released weights load into it),
    its quantizer the codec's, its loss without the f0 and harmonic parts."""
    from encodec import EncodecModel
    torch.manual_seed(0)
    model = C.make_codec(C.CodecConfig(size="encodec"))
    assert isinstance(model, C.CodecModel) and isinstance(model.net, EncodecModel)
    assert model.quantizer is model.net.quantizer
    released = C.make_codec(C.CodecConfig(size="encodec")).net.state_dict()   # the released weights' keys, shapes
    model.net.load_state_dict(released)
    _, parts, out = C.codec_loss(model, torch.randn(1, 8 * C.HOP) * 0.1, 2, torch.tensor([110.0]))
    assert set(parts) == {"stft", "l1", "commit", "loudness"} and out.codes.shape == (1, 2, 8)


def test_codec_load_round_trip(codec_run):
    """Codec.load gives a data.Codec whose codes and audio survive its identity (what an LM checkpoint carries)."""
    out, _ = codec_run
    codec = data.Codec.load(out / "codec.pt", bandwidth=6.0)
    assert codec.kind == "trained" and codec.levels == 8
    audio = torch.randn(2, 30 * data.HOP) * 0.1
    codes = codec.encode(audio)
    assert codes.shape == (2, 8, 30)
    decoded = codec.decode(codes)
    assert decoded.shape == (2, 30 * data.HOP)
    ident = codec.identity()
    json.dumps({k: v for k, v in ident.items() if k not in ("codebooks", "weights")})  # cache keys: plain values
    again = load_codec(ident)
    assert torch.equal(again.encode(audio), codes)
    assert torch.equal(again.decode(codes), decoded)


def test_damaged_or_wrong_codec_file_is_one_line(codec_run, tmp_path):
    out, _ = codec_run
    damaged = tmp_path / "damaged.pt"
    raw = bytearray((out / "codec.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    for path in (damaged, tmp_path / "missing.pt"):
        with pytest.raises(data.DataError) as e:
            data.Codec.load(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    not_codec = tmp_path / "lm.pt"
    checkpoint.save_checkpoint({"model": {}, "config": {}, "tokenizer": {}}, not_codec)
    with pytest.raises(data.DataError, match="not a codec file"):
        data.Codec.load(not_codec)
    # a codec file of an older codec.py (its decoder had one 64-wide harmonic head, its encoder one input fewer)
    older = checkpoint.load_checkpoint(out / "codec.pt")
    state = older["model"]
    state["decoder.harmonic_head.weight"] = state.pop("decoder.distribution_head.weight")
    state["encoder.inp.weight"] = state["encoder.inp.weight"][:, :-1]
    checkpoint.save_checkpoint(older, tmp_path / "older.pt")
    with pytest.raises(data.DataError) as e:
        data.Codec.load(tmp_path / "older.pt")
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "older.pt") in message and "train it again" in message
    assert "decoder.distribution_head.weight" in message and "decoder.harmonic_head.weight" in message
    assert "encoder.inp.weight" in message


LM = ["--data", "synthetic", "--synthetic-notes", "12", "--seconds", "0.2", "--dim", "32", "--depth", "1",
      "--heads", "1", "--dim-head", "16", "--batch-size", "8", "--warmup-iters", "2", "--eval-interval", "3",
      "--max-iters", "3", "--device", "cpu", "--dtype", "float32"]


@pytest.mark.slow
@pytest.mark.parametrize("pattern,bandwidth", [("flatten", "1.5"), ("delay", "1.5"), ("parallel", "6")])
def test_language_model_on_the_trained_codec_samples(codec_run, tmp_path, pattern, bandwidth):
    """train.py --codec PATH trains on the trained codec's codes, its checkpoint carries the codec (kind 'trained',
    its weights), and sample.py decodes with it from the checkpoint alone."""
    from conftest import run
    out, _ = codec_run
    lm = tmp_path / "lm"
    result = run("train.py", *LM, "--codec", str(out / "codec.pt"), "--pattern", pattern, "--bandwidth",
                 bandwidth, "--data-dir", str(tmp_path / "data"), "--out-dir", str(lm), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = checkpoint.load_checkpoint(lm / "ckpt.pt")
    assert ckpt["codec"]["kind"] == "trained" and "weights" in ckpt["codec"]
    result = run("sample.py", "--ckpt", str(lm / "ckpt.pt"), "--num-samples", "2", "--pitch", "60",
                 "--out-dir", str(tmp_path / "samples"), "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.wav")) == ["sample_pitch60_0.wav",
                                                                             "sample_pitch60_1.wav"]


def test_train_refuses_a_language_model_checkpoint_as_codec(tmp_path):
    """train.py --codec with a file that is not a codec: one line naming it, no traceback."""
    from conftest import run
    not_codec = tmp_path / "lm.pt"
    checkpoint.save_checkpoint({"model": {}, "config": {}, "tokenizer": {}}, not_codec)
    result = run("train.py", *LM, "--codec", str(not_codec), "--data-dir", str(tmp_path / "data"),
                 "--out-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 1 and str(not_codec) in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_adversarial_steps_run(codec_run, tmp_path):
    """--adversarial: two steps with EnCodec's MS-STFT discriminator, resumable (its weights are in ckpt.pt)."""
    _, data_dir = codec_run
    train_codec_run(tmp_path / "out", data_dir, "--max-iters", "2", "--adversarial", "--no-pitch-eval")
    ckpt = checkpoint.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert "disc" in ckpt and "disc_optimizer" in ckpt
    train_codec_run(tmp_path / "out", data_dir, "--max-iters", "3", "--adversarial", "--no-pitch-eval", "--resume")
