"""evaluate.py: each metric on cases with a known answer, and the whole table on a small rendered guitar set: the real
notes score near their own ceiling, white noise at the floor, the real notes a semitone up lose PA and CREPE's
accuracy; FID of a set with itself is 0; bad folders and notes are one line each, a damaged classifier retrained."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate
import pitch
from conftest import assert_one_line
from data import SAMPLE_RATE
from test_soundfont import FLUID, TIM, fluidsynth_missing


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 8))
    assert evaluate.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert evaluate.frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # |mu_a - mu_b|^2, same covariance
    assert evaluate.frechet_distance(a, 3 * a) > evaluate.frechet_distance(a, 2 * a) > 1


def test_pitch_and_source_accuracy_count_the_asked_notes_only():
    probs = np.eye(128)[[60, 61, 62, 40]]
    assert evaluate.pitch_accuracy(probs, np.array([60, 61, 50, -1])) == pytest.approx(2 / 3)
    assert evaluate.pitch_entropy(probs) == pytest.approx(0, abs=1e-9)
    assert evaluate.pitch_entropy(np.full((2, 128), 1 / 128)) == pytest.approx(np.log(128))
    sources = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert evaluate.source_accuracy(sources, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    assert evaluate.source_accuracy(sources, np.array([0, -1, 2])) == 1.0   # unknown and synthetic left out


def test_ndb_of_the_training_notes_themselves_is_zero_and_of_other_notes_not():
    gen = torch.Generator().manual_seed(0)
    train = torch.cat([torch.randn(200, 6, generator=gen) + 4 * i for i in range(5)])
    bins = evaluate.kmeans(train, 5, iters=20, gen=gen)
    counts = np.bincount(evaluate.nearest(train, bins).numpy(), minlength=5)
    assert evaluate.ndb_k(train[:, :, None], bins, counts) == 0
    lopsided = train[:400]                          # two of the five clusters only
    assert evaluate.ndb_k(lopsided[:, :, None], bins, counts) == 1.0


def test_crepe_scores_a_tone_at_its_pitch_and_not_a_semitone_off():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE   # seven partials: CREPE's tiny network is unsure of a bare sine
    tone = sum(0.3 / k * np.sin(2 * np.pi * k * pitch.midi_to_hz(57) * t) for k in range(1, 8))
    f0, confidence = pitch.crepe_f0(tone, SAMPLE_RATE)
    right, wrong = pitch.crepe_score(f0, confidence, 57), pitch.crepe_score(f0, confidence, 58)
    # Viterbi decoding gives the centres of CREPE's 20-cent bins: a right tone reads up to 10 cents off before the
    # network's own error (8-10 cents here; 10.3 on another CPU), so "right" is within a fifth of a semitone.
    assert right.rpa > 0.9 and right.error < 0.2 and not right.outlier
    assert wrong.rpa < 0.05 and 0.8 < wrong.error < 1.2
    silent = pitch.crepe_score(f0, np.zeros_like(confidence), 57)
    assert silent.rpa == 0 and silent.outlier        # no confident frame: an outlier, as DDSP counts


needs_fluidsynth = pytest.mark.skipif(fluidsynth_missing() is not None, reason=str(fluidsynth_missing()))


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """A small rendered set (two SoundFonts, four programs, 16 neighbouring pitches, three velocities), the classifier
    trained on its train split, and the table of the real test notes, white noise and the real notes a semitone up."""
    import prepare
    data_dir = tmp_path_factory.mktemp("judge")
    prepare.prepare_soundfont_guitar(data_dir, soundfonts=[str(FLUID), str(TIM)], programs=[24, 25, 26, 27],
                                     pitches=list(range(50, 66)), velocities=[25, 75, 127])
    out = data_dir / "scores.json"
    evaluate.main(["--data-dir", str(data_dir), "--write-floors", str(data_dir / "floors"), "--json", str(out)])
    return data_dir, json.loads(out.read_text())


@pytest.mark.slow
@needs_fluidsynth
def test_real_notes_score_near_their_ceiling_and_the_floors_below(judged):
    data_dir, rows = judged
    real, noise, transposed = rows.values()
    assert set(real) >= {"notes", "pa", "pe", "source_accuracy", "fid", "ndb_k", "crepe_rpa",
                         "crepe_f0_error_semitones", "crepe_outliers", "praat_within_50_cents"}   # pinned names
    assert real["fid"] == pytest.approx(0, abs=1e-6)
    assert real["pa"] > 0.5 and real["crepe_rpa"] > 0.8 and real["praat_within_50_cents"] > 0.9
    assert noise["pa"] < 0.15 and noise["fid"] > 1 and noise["crepe_rpa"] < 0.1
    assert transposed["pa"] < real["pa"] / 2 and transposed["crepe_rpa"] < 0.2
    assert transposed["praat_within_50_cents"] < 0.2
    assert (data_dir / "soundfont-guitar" / "classifier.pt").is_file()


@pytest.mark.slow
@needs_fluidsynth
def test_bad_notes_are_one_line_each_and_a_damaged_classifier_is_retrained(judged, tmp_path, capsys):
    data_dir, _ = judged
    folder = tmp_path / "notes"
    folder.mkdir()
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    sf.write(folder / "sample_pitch57_vel100_acoustic.wav", 0.5 * np.sin(2 * np.pi * 220 * t), SAMPLE_RATE)
    sf.write(folder / "short.wav", np.ones(100) * 0.1, SAMPLE_RATE)
    sf.write(folder / "silent.wav", np.zeros(SAMPLE_RATE), SAMPLE_RATE)
    (folder / "broken.wav").write_bytes(b"RIFF....WAVE")
    real = tmp_path / "real"                       # a one-note ceiling row: the test split's is not what is tested
    real.mkdir()
    sf.write(real / "guitar_acoustic_000-057-100.wav", 0.5 * np.sin(2 * np.pi * 220 * t), SAMPLE_RATE)
    classifier = data_dir / "soundfont-guitar" / "classifier.pt"
    saved = classifier.read_bytes()
    try:
        classifier.write_bytes(saved[:1000])        # damaged: refused in one line and trained again
        rows = evaluate.evaluate(evaluate.parse_args(["--data-dir", str(data_dir), "--real", str(real), str(folder)]))
    finally:
        classifier.write_bytes(saved)
    err = capsys.readouterr().err
    for name in ("short.wav", "silent.wav", "broken.wav"):
        line = next(line for line in err.splitlines() if name in line)
        assert_one_line(line, name)
    assert any("refusing the cached note classifier" in line for line in err.splitlines())
    assert rows[str(folder)]["notes"] == 1
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--data-dir", str(data_dir), str(tmp_path / "nothing-here")])
    assert stop.value.code != 0
