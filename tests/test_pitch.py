"""The pitch tracker and the loudness measure: real labelled guitar notes, synthetic notes of known pitch and level,
silence, the report and the CLI."""
import json
import math
import re
import struct
import sys

import numpy as np
import pytest
import soundfile as sf

import data
import prepare
import pitch
from conftest import REAL_GUITAR, needs_real_guitar, run

pytest.importorskip("parselmouth", reason="pitch.py needs praat-parselmouth: pip install praat-parselmouth")
pytest.importorskip("matplotlib", reason="pitch.py draws spectrograms with matplotlib: pip install matplotlib")


def sine(midi: float, seconds: float, sr: int) -> np.ndarray:
    """A sine at a MIDI pitch that fades like a plucked note."""
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * pitch.midi_to_hz(midi) * t) * np.exp(-t / 0.7)).astype(np.float32)


class ShowInSummary:
    """A pytest plugin that repeats lines in the terminal summary, so that they show without -s."""
    def __init__(self):
        self.lines = []

    def pytest_terminal_summary(self, terminalreporter):
        for line in self.lines:
            terminalreporter.write_line(line)


@pytest.fixture
def show_in_summary(request):
    plugins = request.config.pluginmanager
    if plugins.get_plugin("pitch-summary") is None:
        plugins.register(ShowInSummary(), "pitch-summary")
    return plugins.get_plugin("pitch-summary").lines.append


@needs_real_guitar
def test_real_guitar_notes_are_measured_within_50_cents(show_in_summary):
    """At least 90% of the labelled real notes (metadata.csv's midi_pitch) come out within 50 cents."""
    summary = pitch.pitch_report(pitch.labelled_folder(REAL_GUITAR), pictures=False)
    line = f"real guitar notes, {summary.line} (median |error| {summary.median_abs_cents:.1f} cents)"
    print(f"\n{line}")
    show_in_summary(line)
    assert summary.total == 57
    assert summary.within >= 0.9 * summary.total, summary.line


def test_midi_to_hz_and_cents_error_signs():
    assert pitch.midi_to_hz(69) == 440.0
    assert pitch.midi_to_hz(60) == pytest.approx(261.6256, abs=1e-4)
    assert pitch.cents_error(440.0, 69) == 0.0
    assert pitch.cents_error(pitch.midi_to_hz(70), 69) == pytest.approx(100.0)   # a semitone sharp: +
    assert pitch.cents_error(pitch.midi_to_hz(68.5), 69) == pytest.approx(-50.0)  # a quarter tone flat: -
    assert pitch.cents_error(220.0, 69) == pytest.approx(-1200.0)                # an octave low
    assert math.isnan(pitch.cents_error(math.nan, 60)) and math.isnan(pitch.cents_error(0.0, 60))
    assert pitch.note_name(60) == "C4" and pitch.note_name(61) == "C#4" and pitch.note_name(102) == "F#7"


@pytest.mark.parametrize("sr", [16_000, 24_000])
@pytest.mark.parametrize("midi", [28, 40, 57, 69, 84, 102])
def test_sines_within_10_cents(midi, sr):
    assert abs(pitch.cents_error(pitch.estimate_f0(sine(midi, 1.67, sr), sr), midi)) < 10


@pytest.mark.parametrize("midi", [40, 48, 57, 64, 76, 88])
def test_karplus_strong_plucks_within_10_cents(midi):
    """prepare.pluck's plucked strings (harmonics, a noisy attack, decay), over the synthetic notes' whole range
    (MIDI 40 to 88). Higher up the string's loop length, rounded to a quarter sample, puts the note itself more
    than 10 cents off."""
    rng = np.random.default_rng(midi)
    audio = prepare.pluck(midi, 100, 1.67, data.SAMPLE_RATE, decay=0.996, brightness=0.7, rng=rng)
    assert abs(pitch.cents_error(pitch.estimate_f0(audio, data.SAMPLE_RATE), midi)) < 10


def test_silence_noise_and_too_short_give_nan_not_a_crash():
    sr = 24_000
    rng = np.random.default_rng(0)
    for audio in (np.zeros(sr), np.zeros(0), np.full(sr, np.nan), 0.3 * rng.standard_normal(sr), sine(60, 0.1, sr)):
        assert math.isnan(pitch.estimate_f0(audio, sr))
    with pytest.raises(ValueError, match="mono"):
        pitch.estimate_f0(np.zeros((sr, 2)), sr)


def test_attack_is_skipped_and_a_late_start_is_found():
    """A note that starts after 0.5 s of silence with a loud noise burst on top of its first 50 ms."""
    sr = 24_000
    note = sine(57, 1.5, sr)
    note[: sr // 20] += np.random.default_rng(0).uniform(-1, 1, sr // 20).astype(np.float32)
    audio = np.concatenate([np.zeros(sr // 2, np.float32), note])
    assert abs(pitch.cents_error(pitch.estimate_f0(audio, sr), 57)) < 10


def test_pitch_report_summary_line_and_pngs(tmp_path, capsys):
    sr = 24_000
    rng = np.random.default_rng(0)
    notes = {"right_sine.wav": (sine(60, 1.67, sr), 60),
             "right_pluck.wav": (prepare.pluck(52, 100, 1.67, sr, 0.995, 0.8, rng), 52),
             "a_tone_sharp.wav": (sine(62, 1.67, sr), 60),
             "silent.wav": (np.zeros(sr, np.float32), 60)}
    for name, (audio, _) in notes.items():
        sf.write(tmp_path / name, audio, sr)
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    items = [(tmp_path / name, midi) for name, (_, midi) in notes.items()] + [(tmp_path / "broken.wav", 60)]

    summary = pitch.pitch_report(items)
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "pitch accuracy: 2 of 5 within 50 cents" == summary.line
    assert (summary.within, summary.total) == (2, 5)
    assert "+200.0 cents  MISS" in out and "no pitch" in out and "cannot read audio" in out
    for name in notes:  # a picture beside every readable WAV
        png = (tmp_path / name).with_suffix(".png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "broken.png").exists()

    elsewhere = tmp_path / "pictures"
    pitch.pitch_report(items[:1], out_dir=elsewhere)
    width, height = struct.unpack(">II", (elsewhere / "right_sine.png").read_bytes()[16:24])  # the PNG's IHDR
    assert width >= 600 and height >= 280


def test_pitch_report_in_worker_processes_prints_and_draws_what_one_process_does(tmp_path, capsys, monkeypatch):
    """From POOL_MIN_NOTES notes the report measures in worker processes: the same lines in the asked order, the
    same summary, a picture per note."""
    rng = np.random.default_rng(0)
    items = []
    for i, midi in enumerate((64, 45, 57, 69, 40, 52)):
        path = tmp_path / f"pluck_{i}.wav"
        sf.write(path, prepare.pluck(midi, 100, 1.0, data.SAMPLE_RATE, 0.996, 0.7, rng), data.SAMPLE_RATE)
        items.append((path, midi, 25 + 20 * i, "acoustic"))
    reports = []
    for smallest_pool in (10**9, 1):          # one process, then the pool
        monkeypatch.setattr(pitch, "POOL_MIN_NOTES", smallest_pool)
        summary = pitch.pitch_report(items, out_dir=tmp_path / str(smallest_pool))
        reports.append((capsys.readouterr().out, summary.lines, [(n.path, n.f0, n.source) for n in summary.notes]))
        assert all(note.png.read_bytes()[:4] == b"\x89PNG" for note in summary.notes)
    assert reports[0] == reports[1]
    assert [line.split()[0] for line in reports[1][0].splitlines()[1:7]] == [f"pluck_{i}.wav" for i in range(6)]


@pytest.mark.slow
def test_bench_times_the_report_in_one_process_and_in_workers(tmp_path):
    """bench.py --only report: both rows, timed in one run, the workers' against one process."""
    result = run("bench.py", "--only", "report", "--notes", "3", "--repeats", "1", "--json", "b.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["section"], r["name"], r["vs"]) for r in rows] == [("report", "one process", None),
                                                                  ("report", "a worker per core", "one process")]
    assert rows[0]["notes/s"] > 0 and rows[1]["ratio"] > 0


def test_missing_dependency_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "parselmouth", None)  # import parselmouth now raises ImportError
    with pytest.raises(ImportError, match="pip install praat-parselmouth"):
        pitch.estimate_f0(np.zeros(24_000), 24_000)


@pytest.mark.slow
def test_command_line_single_file_and_labelled_folder(tmp_path):
    sr = 16_000
    sf.write(tmp_path / "note.wav", sine(64, 1.0, sr), sr)
    (tmp_path / "metadata.csv").write_text("file,midi_pitch\nnote.wav,64\n")
    def pitch_py(*args: str) -> str:
        result = run("pitch.py", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout
    out = pitch_py(str(tmp_path / "note.wav"), "--midi", "64")
    assert out.splitlines()[-1] == "pitch accuracy: 1 of 1 within 50 cents"
    assert (tmp_path / "note.png").exists()
    (tmp_path / "note.png").unlink()
    out = pitch_py("--real", str(tmp_path))
    assert out.splitlines()[-1] == "pitch accuracy: 1 of 1 within 50 cents"
    assert not (tmp_path / "note.png").exists()  # a labelled folder gets pictures only with --png-dir


# ----------------------------------------------------------------------------------------------------
# Loudness

def test_levels_of_a_sine_after_silence_silence_and_nan():
    """A 0.5 sine after 0.3 s of silence peaks at -6.0 dBFS and its attack (measured from the onset, not from the
    file's start) has the RMS of a sine, -9.0 dBFS; scaling by g moves both by 20 log10 g; silence reads the floor."""
    sr = 24_000
    t = np.arange(sr) / sr
    audio = np.concatenate([np.zeros(int(0.3 * sr)), 0.5 * np.sin(2 * np.pi * 440 * t)])
    peak, attack = pitch.levels_db(audio, sr)
    assert peak == pytest.approx(20 * math.log10(0.5), abs=0.01)
    assert attack == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.01)
    for gain in (0.1, 0.03):
        assert pitch.levels_db(gain * audio, sr) == pytest.approx((peak + 20 * math.log10(gain),
                                                                   attack + 20 * math.log10(gain)), abs=1e-6)
    assert pitch.levels_db(np.zeros(sr), sr) == (pitch.LEVEL_FLOOR_DB, pitch.LEVEL_FLOOR_DB)
    assert all(math.isnan(x) for x in pitch.levels_db(np.full(sr, np.nan), sr) + pitch.levels_db(np.zeros(0), sr))


def test_levels_kept_reads_a_codec_that_halves_every_note_and_one_that_reverses_their_order():
    """levels_kept: a reconstruction at half the amplitude is 6.0 dB off with the notes' order kept (1.0); one
    whose loudest note is the quietest original has a negative rank correlation."""
    sr = 24_000
    t = np.arange(sr // 2) / sr
    notes = np.stack([g * np.sin(2 * np.pi * 220 * t) * np.exp(-3 * t) for g in (0.1, 0.2, 0.4, 0.8)])
    halved = pitch.levels_kept(notes, notes / 2, sr)
    assert halved["attack_error_db"] == pytest.approx(6.0, abs=0.05) and halved["attack_rank_correlation"] == 1.0
    assert halved["attack_errors_db"] == pytest.approx([-6.0] * 4, abs=0.05)
    assert pitch.levels_kept(notes, notes[::-1], sr)["attack_rank_correlation"] == pytest.approx(-1.0)


def test_rank_correlation_is_spearmans():
    """Ranks, not values; ties share their mean rank; without ties it equals 1 - 6 sum(d^2) / (n (n^2 - 1))."""
    assert pitch.rank_correlation([1, 2, 3, 4], [10, 200, 3000, 40000]) == pytest.approx(1.0)
    assert pitch.rank_correlation([1, 2, 3, 4], [4.0, 3.5, -1.0, -7.0]) == pytest.approx(-1.0)
    # x ranks 1, 2.5, 2.5, 4 and y ranks 1, 3, 2, 4: Pearson's r of those is 0.9486833 (worked by hand)
    assert pitch.rank_correlation([25, 75, 75, 127], [-30.0, -10.0, -20.0, -5.0]) == pytest.approx(3 / math.sqrt(10))
    rng = np.random.default_rng(0)
    for n in (5, 17, 60):
        x, y = rng.permutation(n), rng.permutation(n)
        d = x - y
        assert pitch.rank_correlation(x, y) == pytest.approx(1 - 6 * (d ** 2).sum() / (n * (n ** 2 - 1)))
    assert math.isnan(pitch.rank_correlation([100, 100, 100], [1.0, 2.0, 3.0]))  # one velocity: nothing to rank
    with pytest.raises(ValueError, match="one length"):
        pitch.rank_correlation([1, 2], [1.0])


def test_loudness_follows_velocity_on_synthetic_plucks(tmp_path, capsys):
    """The training notes of the offline run (prepare.pluck: louder and brighter with velocity) at 5 velocities and
    4 pitches: the report's last line ranks their attack levels with the velocities asked, R > 0.9."""
    rng = np.random.default_rng(0)
    items = []
    for midi in (45, 57, 69, 81):
        for velocity in (25, 50, 75, 100, 127):
            path = tmp_path / f"pluck_{midi}_{velocity}.wav"
            sf.write(path, prepare.pluck(midi, velocity, 1.67, data.SAMPLE_RATE, 0.996, 0.7, rng), data.SAMPLE_RATE)
            items.append((path, midi, velocity))
    summary = pitch.pitch_report(items, pictures=False)
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r"loudness vs velocity: rank correlation (-?[01]\.\d\d) over 20 notes", last), last
    r, n = summary.loudness
    assert last == summary.loudness_line and n == 20 and r > 0.9
    # one velocity only: no loudness line, the pitch line stays last
    assert pitch.pitch_report([(p, m, 100) for p, m, _ in items[:3]], pictures=False).lines[-1].startswith("pitch")
    # levels closer than 0.1 dB are equal (no order found in noise): the correlation is undefined, and says so
    quiet = [pitch.NoteResult(path, midi, velocity, attack_db=-20 + 0.01 * i) for i, (path, midi, velocity)
             in enumerate(items[:4])]
    assert pitch.PitchSummary(quiet).loudness_line == ("loudness vs velocity: rank correlation nan over 4 notes "
                                                       "(undefined: the levels, or the velocities, are all equal)")


@needs_real_guitar
def test_loudness_on_the_real_notes_that_carry_a_velocity(show_in_summary):
    """metadata.csv gives a velocity for the NSynth notes only; the report's loudness line ranks those. On every
    real recording the levels move by exactly 20 log10 g when the note is scaled by g (onset and attack found the
    same way at any level), so ranks follow level wherever level follows velocity."""
    labelled = pitch.labelled_folder(REAL_GUITAR)
    with_velocity = [item for item in labelled if item[2] is not None]
    assert with_velocity and all(path.parent.name == "nsynth" for path, _, _ in with_velocity)
    summary = pitch.pitch_report(with_velocity, pictures=False)
    r, n = summary.loudness
    # the line ranks these notes' velocities against their attack levels, measured here once more, independently
    attacks = [pitch.levels_db(*pitch.read_mono(path))[1] for path, _, _ in with_velocity]
    assert n == len(with_velocity) == 3
    expected = pitch.rank_correlation([v for _, _, v in with_velocity], [round(a, 1) for a in attacks])
    assert r == pytest.approx(expected) and not math.isnan(r)
    assert summary.loudness_line == f"loudness vs velocity: rank correlation {expected:.2f} over 3 notes"
    line = f"real guitar notes with a velocity in metadata.csv, {summary.loudness_line}"
    print(f"\n{line}")
    show_in_summary(line)
    for path, _, _ in labelled[::6]:
        audio, sr = pitch.read_mono(path)
        peak, attack = pitch.levels_db(audio, sr)
        assert pitch.levels_db(audio * 0.25, sr) == pytest.approx((peak - 12.041, attack - 12.041), abs=1e-3)


@pytest.mark.slow
def test_command_line_reads_velocities_from_nsynth_names(tmp_path):
    """A folder without metadata.csv: the NSynth-named notes in it are labelled by their names, so the report ranks
    their loudness; three sines made louder with velocity rank perfectly, and a folder of no such notes is an error."""
    sr = 16_000
    for velocity in (127, 25, 75):
        sf.write(tmp_path / f"guitar_acoustic_001-064-{velocity:03d}.wav", sine(64, 1.0, sr) * velocity / 127, sr)
    sf.write(tmp_path / "unlabelled.wav", sine(64, 1.0, sr), sr)
    result = run("pitch.py", "--real", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["pitch accuracy: 3 of 3 within 50 cents",
                                               "loudness vs velocity: rank correlation 1.00 over 3 notes"]
    (tmp_path / "sub").mkdir()
    result = run("pitch.py", "--real", str(tmp_path / "sub"), cwd=tmp_path)
    assert result.returncode != 0 and "no metadata.csv and no NSynth-named notes" in result.stderr
