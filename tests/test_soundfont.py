"""The guitar set rendered from SoundFonts (prepare.py soundfont): NSynth's format and protocol, split by instrument,
read back by the NSynth loader with its labels, hostile SoundFonts refused one line each, a killed render completed.
Needs FluidSynth and two of the system's SoundFonts (.ci/run installs them); skips with the reason otherwise."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import data
import prepare
from conftest import ROOT, run
from tokenizer import NSYNTH_SOURCES

FLUID = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
TIM = Path("/usr/share/sounds/sf2/TimGM6mb.sf2")


def fluidsynth_missing() -> str | None:
    if importlib.util.find_spec("fluidsynth") is None:
        return "pyfluidsynth is not installed"
    probe = subprocess.run([sys.executable, "-c", "import fluidsynth"], capture_output=True, text=True)
    if probe.returncode:
        return f"the FluidSynth library cannot be loaded: {probe.stderr.strip().splitlines()[-1]}"
    missing = [str(p) for p in (FLUID, TIM) if not p.is_file()]
    return f"SoundFonts not installed: {', '.join(missing)}" if missing else None


pytestmark = [pytest.mark.skipif(fluidsynth_missing() is not None, reason=str(fluidsynth_missing())),
              pytest.mark.slow]

# Two SoundFonts x the two acoustic programs: four instruments, so that each split gets one (test, valid) or two
SMALL = dict(soundfonts=[str(FLUID), str(TIM)], programs=[24, 25], pitches=[40, 64], velocities=[50, 127])
SMALL_FLAGS = ["--soundfont", str(FLUID), str(TIM), "--programs", "24", "25", "--pitches", "40,64",
               "--velocities", "50,127"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("soundfont")
    prepare.prepare_soundfont_guitar(data_dir, **SMALL)
    return data_dir


def test_the_set_is_nsynth_format_split_by_instrument(rendered):
    set_dir = rendered / "soundfont-guitar"
    instrument_splits = {}
    for split in ("train", "valid", "test"):
        examples = json.loads((set_dir / f"soundfont-guitar-{split}" / "examples.json").read_text())
        wavs = sorted((set_dir / f"soundfont-guitar-{split}" / "audio").glob("*.wav"))
        assert sorted(examples) == [w.stem for w in wavs] and wavs, split
        for name, e in examples.items():
            assert name == f"{e['instrument_str']}-{e['pitch']:03d}-{e['velocity']:03d}"
            assert e["instrument_source_str"] == ("acoustic" if e["program"] in (24, 25) else "electronic")
            assert e["instrument_family_str"] == "guitar" and e["sample_rate"] == 16_000
            assert {"note", "instrument", "qualities", "instrument_source", "instrument_family"} <= e.keys()
            instrument_splits.setdefault(e["instrument_str"], set()).add(split)
    assert len(instrument_splits) == 4
    assert all(len(splits) == 1 for splits in instrument_splits.values()), instrument_splits  # never in two splits
    assert sorted(s for (s,) in instrument_splits.values()) == ["test", "train", "train", "valid"]


def test_notes_follow_nsynths_protocol(rendered):
    """16 kHz mono, 4 s; the key sounds while held (3 s) and the release fades; velocity 127 louder than 50."""
    wav = sorted((rendered / "soundfont-guitar").glob("*/audio/*-064-127.wav"))[0]
    audio, sr = sf.read(wav)
    soft, _ = sf.read(wav.with_name(wav.name.replace("-127.wav", "-050.wav")))
    assert sr == 16_000 and audio.ndim == 1 and len(audio) == 4 * sr
    rms = lambda x: np.sqrt(np.mean(x ** 2))  # noqa: E731
    assert rms(audio[:sr // 2]) > 10 * rms(audio[-sr // 4:])
    assert rms(audio[:sr // 2]) > 2 * rms(soft[:sr // 2])


def test_the_nsynth_loader_reads_it_with_its_labels(rendered):
    splits = prepare.resolve_data("soundfont-guitar", rendered)   # made already: used as it is, nothing rendered
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "valid": 4, "test": 4}
    examples = data.load_examples_json(splits["test"][0].parent)
    for f in splits["train"] + splits["test"]:
        labels = data.nsynth_labels(f, examples if f in splits["test"] else None)
        pitch, velocity = (int(x) for x in f.stem.split("-")[1:])
        assert (labels["pitch"], labels["velocity"], labels["source"]) == (pitch, velocity, NSYNTH_SOURCES.index("acoustic"))


def test_the_notes_are_at_their_labelled_pitch(rendered):
    import pitch
    for wav in sorted((rendered / "soundfont-guitar").glob("*/audio/*.wav")):
        audio, sr = pitch.read_mono(wav)
        assert abs(pitch.cents_error(pitch.estimate_f0(audio, sr), int(wav.stem.split("-")[1]))) <= 50, wav.name


def test_fluidsynth_is_never_loaded_where_the_models_run(rendered):
    """Rendering happens in child processes: the library is not in this process (it once spoiled later results)."""
    maps = Path(f"/proc/{os.getpid()}/maps")
    if maps.exists():
        assert "libfluidsynth" not in maps.read_text()


def test_hostile_soundfonts_are_one_line_each_and_the_others_render(tmp_path):
    bad = {"empty.sf2": b"", "truncated.sf2": FLUID.read_bytes()[:100_000], "note.sf2": wav_bytes(),
           "text.sf3": b"not a soundfont at all\n"}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    result = run("prepare.py", "soundfont", "--data-dir", str(tmp_path / "data"), "--soundfont",
                 *[str(tmp_path / n) for n in bad], str(TIM), "--programs", "24", "--pitches", "60",
                 "--velocities", "100", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("skipping")]
    assert len(lines) == len(bad)
    for name, line in zip(bad, lines):
        assert str(tmp_path / name) in line
    assert "Traceback" not in result.stderr
    assert "1 notes kept" in result.stdout


def test_no_usable_soundfont_is_one_line(tmp_path):
    (tmp_path / "empty.sf2").write_bytes(b"")
    result = run("prepare.py", "soundfont", "--data-dir", str(tmp_path), "--soundfont", str(tmp_path / "empty.sf2"),
                 cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: none of the 1 SoundFonts can be used")
    assert "Traceback" not in result.stderr


def test_missing_fluidsynth_says_what_to_install(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "fluidsynth.py").write_text('raise ImportError("Couldn\'t find the FluidSynth library.")\n')
    env = {**os.environ, "PYTHONPATH": str(fake)}
    result = run("prepare.py", "soundfont", "--data-dir", str(tmp_path), "--soundfont", str(TIM), cwd=tmp_path,
                 env=env)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "libfluidsynth3" in line and "brew install fluid-synth" in line and "pyfluidsynth" in line


def test_no_soundfont_found_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "find_soundfonts", lambda: [])
    with pytest.raises(data.DataError, match="--soundfont PATH.*fluid-soundfont-gm.*pretty_midi"):
        prepare.prepare_soundfont_guitar(tmp_path)


def test_a_killed_render_is_completed_without_rendering_twice(tmp_path):
    """SIGKILL in the middle, then the same command: every note whole, none half-written, the ones already on disk
    untouched."""
    args = ["prepare.py", "soundfont", "--data-dir", str(tmp_path), "--soundfont", str(FLUID), str(TIM),
            "--programs", "24", "25", "--pitches", "40-60", "--velocities", "25,50,75,100,127", "--workers", "1"]
    process = subprocess.Popen([sys.executable, *[str(ROOT / args[0])] + args[1:]], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    set_dir = tmp_path / "soundfont-guitar"
    deadline = time.time() + 120
    while len(list(set_dir.glob("*/audio/*.wav"))) < 30 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    children = child_processes(process.pid)   # the rendering process (and multiprocessing's resource tracker)
    process.kill()
    process.wait()
    deadline = time.time() + 20    # the rendering process sees its parent gone and stops after the note in hand
    while any(alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    if Path("/proc").exists():     # (Linux: where the children can be listed)
        assert children and not any(alive(pid) for pid in children), "a child of the killed run is still alive"
    before = {p: p.stat().st_mtime_ns for p in set_dir.glob("*/audio/*.wav")}
    assert 0 < len(before) < 4 * 21 * 5 and not (set_dir / "complete.json").exists()
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    after = sorted(set_dir.glob("*/audio/*.wav"))
    assert len(after) == 4 * 21 * 5
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert not list(set_dir.rglob("*.tmp*"))
    for p in after:
        assert sf.info(p).frames == 4 * 16_000


def child_processes(pid: int) -> list[int]:
    """The processes pid started (Linux's /proc/PID/task/*/children)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").glob("*") for c in (task / "children").read_text().split()]


def alive(pid: int) -> bool:
    """pid runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wav_bytes() -> bytes:
    import io
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(1600, np.float32), 16_000, format="WAV")
    return buffer.getvalue()


def test_a_few_codec_steps_on_rendered_notes(rendered, tmp_path):
    """train_codec.py --data soundfont-guitar: the teacher f0 is each note's label, and at the end the test split's
    instrument (never trained on) is evaluated, written to test.json and shown on the reconstruction page."""
    import train_codec
    from pitch import midi_to_hz
    args = train_codec.parse_args(["--data", "soundfont-guitar", "--data-dir", str(rendered), "--out-dir",
                                   str(tmp_path), "--max-iters", "2", "--eval-interval", "2", "--width", "32",
                                   "--batch-size", "4", "--seconds", "0.4", "--crop-frames", "16", "--crop-slack",
                                   "4", "--eval-notes", "2", "--test-notes", "3", "--pitch-shift", "2",
                                   "--device", "cpu"])
    notes = train_codec.load_notes(args, verbose=False)
    train = data.find_audio(rendered / "soundfont-guitar" / "soundfont-guitar-train")
    assert len(notes["train"]) == len(train) and len(notes["valid"]) == 2
    labels = [midi_to_hz(int(f.stem.split("-")[1])) for f in train]
    assert np.allclose(notes["train_f0"].numpy(), labels)
    train_codec.train(args)
    result = json.loads((tmp_path / "test.json").read_text())
    assert list(result) == ["test split"] and set(result["test split"]) == {"bw1.5", "bw6.0"}
    assert result["test split"]["bw6.0"]["pitch_measured"] <= 3
    page = (tmp_path / "reconstructions" / "index.html").read_text()
    assert page.count('<tr id="note') == 3 and page.count("<audio") == 9   # original, 1.5 and 6 kbps
    for wav in (tmp_path / "reconstructions").glob("*.wav"):
        assert wav.name in page and wav.with_suffix(".png").is_file()
