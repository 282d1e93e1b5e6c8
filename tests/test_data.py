"""Audio reading, the untrained codec, the token cache, labels and splits."""
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import prepare
from codec_kinds import load_codec
from conftest import REAL_GUITAR, needs_real_guitar


def sine(freq: float, seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] + [np.zeros_like(x)] * (channels - 1), axis=1) if channels > 1 else x


def peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[spectrum.argmax()]


@pytest.mark.parametrize("ext,fmt", [("wav", "WAV"), ("flac", "FLAC"), ("mp3", "MP3"), ("ogg", "OGG")])
@pytest.mark.parametrize("sr", [16_000, 44_100, 48_000])
def test_formats_and_rates_read_as_24khz(tmp_path, ext, fmt, sr):
    """Every format at any rate comes out as 24 kHz float of the asked length, with the pitch unchanged."""
    path = tmp_path / f"note.{ext}"
    sf.write(path, sine(440, 1.0, sr), sr, format=fmt)
    audio = data.read_audio(path, 12_000)
    assert audio.shape == (12_000,) and audio.dtype == np.float32
    assert abs(peak_hz(audio[2000:], data.SAMPLE_RATE) - 440) < 5


def test_stereo_and_many_channels_are_mixed_to_mono(tmp_path):
    """Channels are averaged: a sine in one of 2 (or 8) channels comes out at 1/2 (1/8) amplitude."""
    for channels in (2, 8):
        path = tmp_path / f"c{channels}.wav"
        sf.write(path, sine(300, 0.5, 24_000, channels), 24_000, subtype="FLOAT")
        audio = data.read_audio(path, 6000)
        assert np.abs(audio).max() == pytest.approx(0.5 / channels, rel=0.02)


def test_short_files_are_zero_padded_and_long_ones_cut(tmp_path):
    """A 0.1 s note is padded with silence; a 60 s note gives just the first samples."""
    sf.write(tmp_path / "short.wav", sine(440, 0.1, 24_000), 24_000)
    short = data.read_audio(tmp_path / "short.wav", 24_000)
    assert np.abs(short[:2000]).max() > 0.4 and not short[2500:].any()
    long = np.zeros(60 * 24_000, np.float32)
    long[:24_000] = sine(440, 1.0, 24_000)
    sf.write(tmp_path / "long.wav", long, 24_000)
    assert np.allclose(data.read_audio(tmp_path / "long.wav", 24_000), long[:24_000], atol=1e-4)


def test_unreadable_files_raise_a_reason(tmp_path):
    """Empty, non-audio and NaN files are refused with a DataError that says why."""
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.flac").write_text("not audio at all")
    nan = sine(440, 0.2, 16_000)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16_000, subtype="FLOAT")
    for name, reason in (("empty.wav", "cannot read"), ("text.flac", "cannot read"), ("nan.wav", "NaN")):
        with pytest.raises(data.DataError, match=reason):
            data.read_audio(tmp_path / name, 1000)


def test_find_audio_is_recursive_sorted_and_skips_non_audio(tmp_path):
    """Audio in subfolders is found in sorted order; other files and folders named like audio are not."""
    (tmp_path / "b").mkdir()
    (tmp_path / "a.wav").mkdir()            # a folder, not a file
    for name in ("b/z.flac", "b/y.MP3", "c.ogg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "b" / "loop")  # a symlink loop must not hang the walk
    found = [p.relative_to(tmp_path).as_posix() for p in data.find_audio(tmp_path)]
    assert found == ["b/y.MP3", "b/z.flac", "c.ogg"]


def test_untrained_codec_needs_fitting_and_then_uses_many_codes(synthetic_folder, fitted_codec):
    """The trap: an unfitted untrained EnCodec maps everything to code 0; ours, fitted, uses many codes at every level."""
    files = data.find_audio(synthetic_folder)
    audio = torch.from_numpy(np.stack([data.read_audio(f, 12_000) for f in files]))
    raw = data.Codec.untrained(1.5, seed=0).encode(audio)
    assert raw.unique().tolist() == [0]
    codes = fitted_codec.encode(audio)
    assert codes.shape == (len(files), 2, -(-12_000 // data.HOP))  # frames = ceil(samples / hop)
    for level in range(2):
        assert codes[:, level].unique().numel() > 100


def test_codec_identity_round_trip(fitted_codec):
    """A checkpoint's codec identity rebuilds a codec that encodes and decodes exactly like the original."""
    rebuilt = load_codec(fitted_codec.identity())
    audio = torch.randn(2, 6400) * 0.1
    assert torch.equal(rebuilt.encode(audio), fitted_codec.encode(audio))
    codes = fitted_codec.encode(audio)
    assert torch.allclose(rebuilt.decode(codes), fitted_codec.decode(codes))
    assert fitted_codec.decode(codes).shape == (2, 6400)


@pytest.mark.parametrize("bandwidth,levels", [(3.0, 4), (6.0, 8), (12.0, 16), (24.0, 32)])
def test_higher_bandwidths_give_more_levels(synthetic_folder, bandwidth, levels):
    """3, 6, 12 and 24 kbps fit and encode 4, 8, 16 and 32 codebooks. On these 960 latents the residual left for
    the levels past the 8th or so is close to nothing (k-means fits 240 clusters per level), so only the first 8
    levels are held to using many codes."""
    files = data.find_audio(synthetic_folder)
    audio = torch.from_numpy(np.stack([data.read_audio(f, 12_800) for f in files]))
    codec = data.Codec.untrained(bandwidth, seed=0)
    codec.fit(audio, iters=2)
    codes = codec.encode(audio)
    assert codes.shape == (len(files), levels, 40) and codec.levels == levels
    assert ((codes >= 0) & (codes < 1024)).all()
    for level in range(min(levels, 8)):
        assert codes[:, level].unique().numel() > 20


class CountingCodec:
    """Wraps a codec and counts the notes it encodes."""

    def __init__(self, codec):
        self.codec, self.encoded, self.levels, self.device = codec, 0, codec.levels, codec.device

    def encode(self, audio):
        self.encoded += len(audio)
        return self.codec.encode(audio)

    def identity(self):
        return self.codec.identity()


def test_token_cache_hit_and_invalidation(tmp_path, synthetic_folder, fitted_codec):
    """Second run encodes nothing and returns the same codes; a changed file and a new file are the only ones
    encoded again; bad files are skipped, counted and remembered."""
    folder = tmp_path / "notes"
    shutil.copytree(synthetic_folder / "train", folder)
    (folder / "broken.wav").write_bytes(b"RIFF....garbage")
    files = data.find_audio(folder)
    codec = CountingCodec(fitted_codec)
    cache = data.cache_path(tmp_path / "cache", "train", files, fitted_codec, 20)

    first = data.encode_files(files, codec, 20, cache, batch_size=8)
    assert codec.encoded == len(files) - 1 and cache.exists()
    assert [p.name for p, _ in first.skipped] == ["broken.wav"] and len(first.files) == len(files) - 1

    codec.encoded = 0
    second = data.encode_files(files, codec, 20, cache)
    assert codec.encoded == 0
    assert np.array_equal(first.codes, second.codes) and second.files == first.files and len(second.skipped) == 1

    changed = first.files[0]
    sf.write(changed, sine(880, 1.0, 16_000), 16_000)
    shutil.copy(files[1], folder / "zz_new.wav")
    files = data.find_audio(folder)
    third = data.encode_files(files, codec, 20, cache)
    assert codec.encoded == 2
    assert len(third.files) == len(first.files) + 1
    assert not np.array_equal(third.codes[0], first.codes[0])
    assert np.array_equal(third.codes[1:len(first.files)], first.codes[1:])


def test_cache_key_changes_with_codec_and_length(tmp_path, synthetic_folder, fitted_codec):
    """Another codec (seed or bandwidth) or another note length uses another cache file."""
    files = data.find_audio(synthetic_folder)
    base = data.cache_path(tmp_path, "train", files, fitted_codec, 20)
    other_seed = data.Codec.untrained(1.5, seed=1, codebooks=fitted_codec.codebooks())
    assert data.cache_path(tmp_path, "train", files, other_seed, 20) != base
    assert data.cache_path(tmp_path, "train", files, fitted_codec, 21) != base
    assert data.cache_path(tmp_path, "valid", files, fitted_codec, 20) != base


def test_interrupted_encoding_keeps_its_progress(tmp_path, synthetic_folder, fitted_codec):
    """Encoding that dies half-way leaves a valid cache of what was done; the next run encodes only the rest."""
    files = data.find_audio(synthetic_folder)
    cache = tmp_path / "cache.npz"

    class Dies(CountingCodec):
        def encode(self, audio):
            if self.encoded >= 8:
                raise KeyboardInterrupt
            return super().encode(audio)

    with pytest.raises(KeyboardInterrupt):
        data.encode_files(files, Dies(fitted_codec), 20, cache, batch_size=4, save_every=0)
    assert cache.exists() and not list(tmp_path.glob("*.tmp*"))
    codec = CountingCodec(fitted_codec)
    result = data.encode_files(files, codec, 20, cache, batch_size=4)
    assert codec.encoded == len(files) - 8 and len(result.files) == len(files)


def test_nsynth_labels_from_names_and_examples_json(tmp_path):
    """NSynth names give pitch, velocity and source; examples.json wins when present; other names are unknown."""
    path = tmp_path / "guitar_electronic_022-061-075.mp3"
    assert data.nsynth_labels(path) == {"pitch": 61, "velocity": 75, "source": 1}
    assert data.nsynth_labels(tmp_path / "acoustic_iowa_038_D2.flac") == {"pitch": -1, "velocity": -1, "source": -1}
    examples = {"guitar_electronic_022-061-075": {"pitch": 62, "velocity": 100, "instrument_source": 2}}
    (tmp_path / "examples.json").write_text(json.dumps(examples))
    assert data.nsynth_labels(path, data.load_examples_json(tmp_path)) == {"pitch": 62, "velocity": 100, "source": 2}


def test_synthetic_notes_are_deterministic_labelled_and_in_tune(tmp_path):
    """make_synthetic is reproducible, names notes like NSynth, and each note sounds at its labelled pitch."""
    a = prepare.make_synthetic(tmp_path / "a", num_notes=12, seed=3, seconds=1.0)
    b = prepare.make_synthetic(tmp_path / "b", num_notes=12, seed=3, seconds=1.0)
    files_a, files_b = data.find_audio(a), data.find_audio(b)
    assert [f.name for f in files_a] == [f.name for f in files_b] and len(files_a) == 12
    assert (a / "valid").is_dir() and (a / "train").is_dir()
    for fa, fb in zip(files_a, files_b):
        assert np.array_equal(sf.read(fa)[0], sf.read(fb)[0])
        label = data.nsynth_labels(fa)
        assert 40 <= label["pitch"] <= 88 and label["velocity"] in (25, 50, 75, 100, 127)
        audio, sr = sf.read(fa)
        x = audio[800:8800] - audio[800:8800].mean()
        ac = np.correlate(x, x, "full")[len(x) - 1:]
        expected = 440 * 2 ** ((label["pitch"] - 69) / 12)
        lo = int(sr / expected / 1.5)
        lag = lo + ac[lo:int(sr / expected * 1.5)].argmax()
        cents = 1200 * np.log2((sr / lag) / expected)
        assert abs(cents) < 60, (fa.name, cents)  # integer-lag estimate: about 20 cents of resolution up high


def test_split_folder_uses_named_splits_or_a_stable_five_percent(tmp_path):
    """*train*/*valid* subfolders become the splits; otherwise about 5% of files by name, the same every time."""
    for split in ("my-train", "my-valid"):
        (tmp_path / "named" / split).mkdir(parents=True)
        (tmp_path / "named" / split / "x.wav").write_bytes(b"")
    named = data.split_folder(tmp_path / "named")
    assert [f.parent.name for f in named["train"]] == ["my-train"]
    assert [f.parent.name for f in named["valid"]] == ["my-valid"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(400):
        (flat / f"note_{i:03d}.wav").write_bytes(b"")
    split = data.split_folder(flat)
    assert 8 <= len(split["valid"]) <= 40 and len(split["train"]) + len(split["valid"]) == 400
    assert not set(split["train"]) & set(split["valid"])
    assert split == data.split_folder(flat)
    with pytest.raises(data.DataError, match="no such folder"):
        data.split_folder(tmp_path / "missing")


def test_empty_folder_is_a_clear_error(tmp_path):
    """A folder without audio is a DataError naming the folder."""
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(data.DataError, match="no audio files"):
        data.split_folder(tmp_path)


@needs_real_guitar
def test_real_guitar_notes_encode(tmp_path, fitted_codec):
    """All 57 recorded notes (NSynth WAV, 44.1 kHz FLAC) read, encode and are cached outside the read-only folder."""
    files = data.find_audio(REAL_GUITAR)
    assert len(files) == 57
    cache = data.cache_path(tmp_path / "cache", "real", files, fitted_codec, 40)
    encoded = data.encode_files(files, fitted_codec, 40, cache)
    assert not encoded.skipped and encoded.codes.shape == (57, 2, 40)
    assert cache.is_relative_to(tmp_path)
    assert len(np.unique(encoded.codes[:, 0])) > 100
    nsynth = [f for f in encoded.files if f.name.startswith("guitar_")]
    assert [data.nsynth_labels(f)["pitch"] for f in nsynth] == [48, 51, 102]
