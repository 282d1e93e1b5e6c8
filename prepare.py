"""
Getting notes onto disk: the reference's NSynth guitar set, guitars rendered from SoundFonts, and synthetic plucked
strings.

    python prepare.py nsynth-guitar            # download (335 MB, resumable, checksummed) and extract into data/
    python prepare.py soundfont                # render the installed SoundFonts' guitars NSynth's way (1 min)
    python prepare.py soundfont --soundfont my.sf2 --programs 24 25   # your own SoundFont's nylon and steel
    python prepare.py synthetic --notes 300    # write 300 plucked-string notes, NSynth-style names, into data/

train.py and train_codec.py call the same functions for --data nsynth-guitar, soundfont-guitar and synthetic
(resolve_data), so running this first is optional; it is here to fetch or render ahead of time, to render with
other settings, or to look at the notes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from cli import pitches as pitch_list, velocities as velocity_list
from data import DataError, find_audio, split_folder
from files import append_log, atomic_write
from tokenizer import NSYNTH_SOURCES

# ----------------------------------------------------------------------------------------------------
# Downloads

NSYNTH_URL = ("https://media.githubusercontent.com/media/SonyCSLParis/test-lfs/refs/heads/master/"
              "NSYNTH_GUITAR_MP3.zip")
NSYNTH_SHA256 = "cbabb3ba2ce81c28982eb41c3ba5127a0d81a3cd72d55d427a95f0558e43dfb3"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download url to dest with a progress bar. A partial download (dest + '.part') is resumed with an
    HTTP Range request; the finished file is checked against sha256 before it takes its final name."""
    dest = Path(dest)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the partial file may be complete
            response = None
        else:
            raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"download of {url} failed: {getattr(e, 'reason', e)}") from None
    if response is not None:
        with response:
            resumed = response.status == 206
            if have and not resumed:  # the server ignored Range: start over
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(part, "ab" if resumed else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                try:
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        f.write(chunk)
                        bar.update(len(chunk))
                except (OSError, urllib.error.URLError) as e:
                    raise DataError(f"download of {url} was cut off ({e}); run again to resume") from None
                # a dropped connection often just ends the stream early instead of raising
                if total is not None and f.tell() < total:
                    raise DataError(f"download of {url} was cut off at {f.tell()} of {total} bytes; "
                                    "run again to resume")
    if sha256 is not None:
        actual = sha256_of(part)
        if actual != sha256:
            part.unlink()
            raise DataError(f"download of {url} is corrupt (sha256 {actual[:12]}..., expected {sha256[:12]}...); "
                            "the partial file was removed, run again to download it anew")
    os.replace(part, dest)
    return dest


def extract_zip(archive: Path, into: Path) -> None:
    """Extract archive into `into`, via a temporary folder so a half-extracted set is never taken for a whole one.
    The NSynth guitar zip needs `zip -F` (as in the reference notebook) when Python cannot read it as it is."""
    tmp = into.with_name(into.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    except zipfile.BadZipFile:
        fixed = archive.with_name(archive.stem + "-fixed.zip")
        if shutil.which("zip") is None:
            raise DataError(f"{archive} is not a readable zip, and `zip` (to repair it with zip -F) is not "
                            "installed; install zip and run again") from None
        try:
            subprocess.run(["zip", "-F", str(archive), "--out", str(fixed)], check=True, capture_output=True)
            with zipfile.ZipFile(fixed) as z:
                z.extractall(tmp)
        except (subprocess.CalledProcessError, zipfile.BadZipFile):
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"{archive} is damaged and `zip -F` could not repair it; delete it to download it "
                            "again") from None
        finally:
            fixed.unlink(missing_ok=True)
    # an archive whose entries all sit in one top folder: use that folder's contents
    entries = [p for p in tmp.iterdir() if p.name != "__MACOSX"]
    top = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
    shutil.rmtree(into, ignore_errors=True)
    os.replace(top, into)
    shutil.rmtree(tmp, ignore_errors=True)


def prepare_nsynth(data_dir: str | Path = "data", url: str = NSYNTH_URL, sha256: str | None = NSYNTH_SHA256) -> Path:
    """The reference's NSynth guitar set, downloaded once into data_dir and extracted; returns its folder,
    which holds nsynth-guitar-train, nsynth-guitar-valid and nsynth-guitar-test."""
    data_dir = Path(data_dir)
    folder = data_dir / "NSYNTH_GUITAR_MP3"
    if not folder.is_dir():
        archive = data_dir / "NSYNTH_GUITAR_MP3.zip"
        try:
            download(url, archive, sha256)
        except DataError as e:
            raise DataError(f"{e}. The NSynth guitar set (335 MB) is downloaded once into {data_dir}/. Without a "
                            "network, use --data PATH with a folder of your own notes (.wav/.flac/.mp3/.ogg), or "
                            "--data synthetic for generated plucked-string notes.") from None
        extract_zip(archive, folder)
    return folder


# ----------------------------------------------------------------------------------------------------
# Synthetic plucked strings (Karplus-Strong)

def pluck(pitch: int, velocity: int, seconds: float, sample_rate: int, decay: float, brightness: float,
          rng: np.random.Generator) -> np.ndarray:
    """A Karplus-Strong plucked string: a burst of noise circulates in a delay line one period long, and
    averaging neighbouring samples on each pass (a low-pass filter) makes it ring and fade like a string.
    Computed 4x oversampled, one period per numpy step, so the period can be tuned to a quarter sample."""
    over = 4
    fs = sample_rate * over
    f0 = 440.0 * 2 ** ((pitch - 69) / 12)
    # one pass round the loop takes `period` samples plus the averaging filter's half-sample delay
    period = max(2, int(round(fs / f0 - 0.5)))
    n = int(seconds * fs)
    noise = rng.uniform(-1, 1, period)
    # softer notes start duller: smooth the initial noise burst more
    for _ in range(int(round((1 - velocity / 127) * 8 + (1 - brightness) * 8))):
        noise = 0.5 * (noise + np.roll(noise, 1))
    out = np.empty(((n + period - 1) // period) * period)
    line = noise
    for start in range(0, len(out), period):
        out[start:start + period] = line
        line = decay * 0.5 * (line + np.roll(line, 1))   # average with the previous sample
    out = out[:n].reshape(-1, over).mean(axis=1)          # back to sample_rate (box filter)
    out *= (velocity / 127) * 0.8 / (np.abs(out).max() + 1e-9)
    return out.astype(np.float32)


def make_synthetic(folder: str | Path, num_notes: int = 300, seed: int = 0, seconds: float = 4.0,
                   sample_rate: int = 16_000) -> Path:
    """Write num_notes plucked-string notes as NSynth-like 16 kHz WAVs named guitar_{source}_{inst}-{pitch}-{vel}
    into folder/train and folder/valid (every 10th note). Deterministic in (num_notes, seed); returns folder."""
    folder = Path(folder)
    done = folder / "complete.json"
    if done.exists():
        return folder
    rng = np.random.default_rng(seed)
    instruments = [(0.990 + 0.009 * rng.random(), 0.3 + 0.7 * rng.random()) for _ in range(12)]  # decay, brightness
    notes: dict[str, tuple] = {}
    while len(notes) < num_notes:
        inst, pitch, velocity = int(rng.integers(12)), int(rng.integers(40, 89)), int(rng.choice([25, 50, 75, 100, 127]))
        name = f"guitar_{NSYNTH_SOURCES[inst % 3]}_{inst:03d}-{pitch:03d}-{velocity:03d}"
        notes.setdefault(name, (inst, pitch, velocity))
    shutil.rmtree(folder, ignore_errors=True)
    for i, (name, (inst, pitch, velocity)) in enumerate(notes.items()):
        split = folder / ("valid" if i % 10 == 9 else "train")
        split.mkdir(parents=True, exist_ok=True)
        decay, brightness = instruments[inst]
        audio = pluck(pitch, velocity, seconds, sample_rate, decay, brightness, rng)
        sf.write(split / f"{name}.wav", audio, sample_rate, subtype="PCM_16")
    done.write_text(json.dumps({"num_notes": num_notes, "seed": seed}))
    return folder


# ----------------------------------------------------------------------------------------------------
# Guitars rendered from SoundFonts, NSynth's way
#
# NSynth was made by playing sample libraries note by note: every pitch at five velocities, the key held 3 s and
# released, 4 s at 16 kHz, split by instrument. A General MIDI SoundFont holds recorded guitar samples under programs
# 24-31 and FluidSynth plays them, so the same protocol gives an NSynth-format guitar set offline, exactly labelled.

SOUNDFONT_SET = "soundfont-guitar"        # --data soundfont-guitar reads DATA_DIR/soundfont-guitar/
GM_GUITARS = {24: "acoustic", 25: "acoustic", 26: "electronic", 27: "electronic", 28: "electronic",
              29: "electronic", 30: "electronic", 31: "electronic"}  # GM program -> NSynth instrument source
GUITAR_FAMILY = 3                         # NSynth's instrument_family index of "guitar"
DEFAULT_PROGRAMS = list(range(24, 31))    # nylon, steel, jazz, clean, muted, overdriven, distortion; 31 (harmonics)
                                          # sounds an overtone, not the key
DEFAULT_PITCHES = list(range(40, 89))
DEFAULT_VELOCITIES = [25, 50, 75, 100, 127]
RENDER_RATE, HELD_S, NOTE_S = 16_000, 3.0, 4.0
SYNTH_GAIN = 1.0                          # the loudest guitar presets peak near -2 dBFS at velocity 127
SILENT_PEAK = 1e-3                        # below -60 dBFS: a key outside the preset's range, dropped
FINGERPRINT_PITCHES = (45, 57, 69, 81)
SAME_INSTRUMENT = 0.9                     # fingerprint correlation: 0.94-1.0 between copies of one instrument in two
                                          # SoundFonts, at most 0.83 between different ones (docs/soundfonts.md)
SOUNDFONT_DIRS = ("/usr/share/sounds/sf2", "/usr/share/sounds/sf3", "/usr/local/share/sounds/sf2",
                  "/usr/local/share/sounds/sf3")
INSTALL_HINT = ("apt-get install libfluidsynth3 (Debian, Ubuntu) or brew install fluid-synth (macOS), and pip "
                "install pyfluidsynth")


def find_soundfonts() -> list[Path]:
    """The SoundFonts installed: the system's (Debian and Ubuntu packages put them under /usr/share/sounds/sf2 and
    sf3), and the TimGM6mb.sf2 that the pretty_midi package carries. One of each (links and copies counted once)."""
    found = [p.resolve() for d in SOUNDFONT_DIRS for p in sorted(Path(d).glob("*.sf[23]"))]
    spec = importlib.util.find_spec("pretty_midi")
    if spec and spec.submodule_search_locations:
        found += sorted(Path(spec.submodule_search_locations[0]).glob("*.sf2"))
    unique, seen = [], set()
    for path in found:
        try:
            key = (path.stat().st_size, sha256_of(path))
        except OSError:
            continue
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def soundfont_problem(path: Path) -> str | None:
    """Why path is no SoundFont FluidSynth can read (None if its RIFF header says it is one): read from the header,
    so a hostile file is refused before the synthesizer opens it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(12)
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    if size == 0:
        return "it is empty"
    if header[:4] != b"RIFF" or len(header) < 12:
        return "not a SoundFont (no RIFF header)"
    if header[8:12] != b"sfbk":
        return f"not a SoundFont (a RIFF {header[8:12].decode('latin-1').strip()} file)"
    declared = int.from_bytes(header[4:8], "little") + 8
    if declared > size:
        return f"truncated ({size} of {declared} bytes)"
    return None


class SoundFontPlayer:
    """FluidSynth playing one SoundFont, one note at a time, with NSynth's protocol. Made only in a child process of
    its own (render_in_child): notes rendered in the process that then ran the codec and the pitch tracker once came
    back wrong, cause unknown, so the library is never loaded where the models run."""

    def __init__(self, path: Path):
        import ctypes
        try:
            import fluidsynth
        except ImportError as e:   # the binding, or the library it looks for when imported
            raise DataError(f"FluidSynth cannot be loaded ({e}): {INSTALL_HINT}") from None
        self.synth = fluidsynth.Synth(gain=SYNTH_GAIN, samplerate=RENDER_RATE)
        for setting, value in (("synth.reverb.active", 0), ("synth.chorus.active", 0),   # dry, as NSynth's notes
                               ("synth.dynamic-sample-loading", 1)):   # only the guitars' samples are decoded
            self.synth.setting(setting, value)
        self.lib = ctypes.CDLL(fluidsynth.find_libfluidsynth())   # for float output: the binding's is 16-bit dithered
        self.sfid = self.synth.sfload(str(path))
        if self.sfid < 0:
            raise DataError(f"{path}: FluidSynth could not load it (damaged?)")
        self.note(DEFAULT_PROGRAMS[0], 60, 100)   # the first note after loading differs slightly from later ones

    def preset(self, program: int) -> str | None:
        """The name of GM program `program` (bank 0) in this SoundFont, None if it has none."""
        return self.synth.sfpreset_name(self.sfid, 0, program)

    def samples(self, n: int) -> np.ndarray:
        import ctypes
        left, right = np.zeros(n, np.float32), np.zeros(n, np.float32)
        as_pointer = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
        self.lib.fluid_synth_write_float(ctypes.c_void_p(self.synth.synth), n, as_pointer(left), 0, 1,
                                         as_pointer(right), 0, 1)
        return (left + right) / 2

    def note(self, program: int, pitch: int, velocity: int) -> np.ndarray:
        """The key held HELD_S seconds and released, NOTE_S seconds in all, mono float32 at RENDER_RATE."""
        self.synth.program_select(0, self.sfid, 0, program)
        self.synth.noteon(0, pitch, velocity)
        held = self.samples(int(HELD_S * RENDER_RATE))
        self.synth.noteoff(0, pitch)
        released = self.samples(int((NOTE_S - HELD_S) * RENDER_RATE))
        self.synth.all_sounds_off(0)
        self.synth.cc(0, 121, 0)   # reset the controllers: every note starts from the same state
        self.samples(64)
        return np.concatenate([held, released])


def survey_soundfont(path: Path, programs: list[int]) -> dict:
    """In a child process: {program: (preset name, fingerprint)} for the programs the SoundFont has. The fingerprint
    (log spectrogram of four notes) tells the same recorded instrument in two SoundFonts (MuseScore_General's guitars
    are FluidR3's, csound's GM bank holds TimGM6mb's), which must not be split between train and test."""
    player = SoundFontPlayer(path)
    found = {}
    for program in programs:
        name = player.preset(program)
        if name is not None:
            found[program] = (name, np.concatenate([log_spectrogram(player.note(program, p, 100)[:2 * RENDER_RATE])
                                                    for p in FINGERPRINT_PITCHES]).ravel())
    return found


def log_spectrogram(audio: np.ndarray, n_fft: int = 1024) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::n_fft // 4] * np.hanning(n_fft)
    return np.log(np.abs(np.fft.rfft(frames)) + 1e-4)


def render_soundfont(path: Path, instruments: list[dict], pitches: list[int], velocities: list[int],
                     set_dir: Path) -> None:
    """In a child process: every note of the instruments (one SoundFont's programs) not on disk yet. Each WAV is
    written atomically and a silent note is logged in silent.jsonl, so a killed run goes on where it stopped, never
    keeping half a note or rendering one twice."""
    done_silent = silent_notes(set_dir)
    parent = os.getppid()
    player = SoundFontPlayer(path)
    for inst in instruments:
        folder = set_dir / f"{SOUNDFONT_SET}-{inst['split']}" / "audio"
        folder.mkdir(parents=True, exist_ok=True)
        for pitch in pitches:
            for velocity in velocities:
                name = f"{inst['instrument_str']}-{pitch:03d}-{velocity:03d}"
                wav = folder / f"{name}.wav"
                if wav.exists() or name in done_silent:
                    continue
                if os.getppid() != parent:   # the run was killed: stop with it (between two whole notes), and
                    os._exit(1)              # exit: a worker that returned would wait for its next task forever
                audio = player.note(inst["program"], pitch, velocity)
                if np.abs(audio).max() < SILENT_PEAK:
                    append_log(set_dir / "silent.jsonl", {"note": name})
                else:
                    atomic_write(wav, lambda f: sf.write(f, audio, RENDER_RATE, subtype="PCM_16", format="WAV"))


def silent_notes(set_dir: Path) -> set[str]:
    """The notes found silent so far (a line cut short by a kill is skipped: that note is rendered again)."""
    path, names = set_dir / "silent.jsonl", set()
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            names.add(json.loads(line)["note"])
        except (ValueError, KeyError, TypeError):
            continue
    return names


def in_child(function, *args):
    """function(*args) in a fresh process ('spawn': nothing of this one is inherited); a DataError raised there comes
    back as it is, and a child that crashed (a SoundFont that brings down the synthesizer) as a DataError."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(function, *args).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise DataError(f"{args[0]}: the synthesizer crashed on it") from None


def split_instruments(instruments: list[dict], held_out: float = 0.15) -> None:
    """Give each instrument its split, as NSynth splits: by instrument, so that the valid and test instruments never
    appear in train. Within each source, the instruments in a fixed order (by a hash of SoundFont name and program,
    which does not move when another SoundFont is added) go held_out to test, held_out to valid (at least one each
    where a source has three or more), the rest to train."""
    for source in ("acoustic", "electronic"):
        group = sorted((i for i in instruments if i["source"] == source and "duplicate_of" not in i),
                       key=lambda i: zlib.crc32(f"{i['soundfont']}:{i['program']}".encode()))
        n_held = max(1, round(held_out * len(group))) if len(group) >= 3 else 0
        for rank, inst in enumerate(group):
            inst["split"] = "test" if rank < n_held else "valid" if rank < 2 * n_held else "train"
        if len(group) == 2:   # too few to hold one out for validation: one to train, one to test
            group[0]["split"] = "test"


def prepare_soundfont_guitar(data_dir: str | Path = "data", soundfonts: list[str] | None = None,
                             programs: list[int] = DEFAULT_PROGRAMS, pitches: list[int] = DEFAULT_PITCHES,
                             velocities: list[int] = DEFAULT_VELOCITIES, workers: int = 2) -> Path:
    """The guitar set rendered from SoundFonts (the system's, or `soundfonts`) into data_dir/soundfont-guitar in
    NSynth's format: one folder per split (soundfont-guitar-train, -valid, -test), each with audio/NAME.wav
    (guitar_{source}_{instrument:03d}-{pitch:03d}-{velocity:03d}) and examples.json. Made once: an existing set is
    used as it is; one asked for with other settings is rendered anew; an interrupted one is completed."""
    set_dir = Path(data_dir) / SOUNDFONT_SET
    asked_defaults = soundfonts is None and (programs, pitches, velocities) == (
        DEFAULT_PROGRAMS, DEFAULT_PITCHES, DEFAULT_VELOCITIES)
    if asked_defaults and (set_dir / "complete.json").exists():
        return set_dir   # made before (by train.py's first use, or by prepare.py with any flags): use it as it is
    paths = [Path(p) for p in soundfonts] if soundfonts else find_soundfonts()
    if not paths:
        raise DataError(f"no SoundFont found in {' or '.join(SOUNDFONT_DIRS[:2])} or the pretty_midi package, and "
                        "none given with --soundfont PATH: apt-get install fluid-soundfont-gm timgm6mb-soundfont "
                        "(Debian, Ubuntu), or pip install pretty_midi (it carries TimGM6mb.sf2)")
    usable = []
    for path in paths:
        problem = soundfont_problem(path)
        if problem:
            print(f"skipping {path}: {problem}", file=sys.stderr)
        else:
            usable.append(path)
    if not usable:
        raise DataError(f"none of the {len(paths)} SoundFonts can be used (each is named above, with the reason)")
    request = {"soundfonts": [[str(p), p.stat().st_size] for p in usable], "programs": programs, "pitches": pitches,
               "velocities": velocities, "sample_rate": RENDER_RATE, "held_s": HELD_S, "seconds": NOTE_S}
    made = json.loads((set_dir / "request.json").read_text()) if (set_dir / "request.json").exists() else None
    if made == request and (set_dir / "complete.json").exists():
        return set_dir
    if made != request:   # another set was here, or none: start anew
        if set_dir.exists():
            print(f"{set_dir} was rendered with other settings: rendering it anew")
        shutil.rmtree(set_dir, ignore_errors=True)
        set_dir.mkdir(parents=True)
        atomic_write(set_dir / "request.json", lambda f: f.write(json.dumps(request).encode()))
    (set_dir / "complete.json").unlink(missing_ok=True)

    instruments = survey(usable, programs, workers)
    split_instruments(instruments)
    kept = [i for i in instruments if "duplicate_of" not in i]
    by_soundfont = {p: [i for i in kept if i["soundfont_path"] == str(p)] for p in usable}
    print(f"rendering {len(kept) * len(pitches) * len(velocities)} notes ({len(kept)} instruments x "
          f"{len(pitches)} pitches x {len(velocities)} velocities) into {set_dir}")
    with concurrent.futures.ThreadPoolExecutor(workers) as threads:
        jobs = {threads.submit(in_child, render_soundfont, p, insts, pitches, velocities, set_dir): p
                for p, insts in by_soundfont.items() if insts}
        for job in tqdm(concurrent.futures.as_completed(jobs), total=len(jobs), desc="SoundFonts", disable=None):
            job.result()
    return finish_soundfont_set(set_dir, instruments, pitches, velocities)


def survey(paths: list[Path], programs: list[int], workers: int) -> list[dict]:
    """The guitar instruments of the SoundFonts (each surveyed in a child process), named NSynth's way and numbered
    within their source; an instrument that sounds the same as one before it is kept once (duplicate_of)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as threads:
        futures = {p: threads.submit(in_child, survey_soundfont, p, programs) for p in paths}
    instruments, counts, fingerprints = [], {"acoustic": 0, "electronic": 0}, []
    for path, future in futures.items():
        try:
            found = future.result()
        except DataError as e:
            if "FluidSynth cannot be loaded" in str(e):
                raise
            print(f"skipping {path}: {str(e).removeprefix(f'{path}: ')}", file=sys.stderr)
            continue
        for program, (preset, fingerprint) in found.items():
            inst = {"soundfont": path.name, "soundfont_path": str(path), "program": program, "preset": preset,
                    "source": GM_GUITARS[program]}
            same = [other for other, f in fingerprints
                    if other["program"] == program and np.corrcoef(f, fingerprint)[0, 1] > SAME_INSTRUMENT]
            if same:
                inst["duplicate_of"] = same[0]["instrument_str"]
            else:
                inst["instrument"] = len(fingerprints)
                inst["instrument_str"] = f"guitar_{inst['source']}_{counts[inst['source']]:03d}"
                counts[inst["source"]] += 1
                fingerprints.append((inst, fingerprint))
            instruments.append(inst)
    if not fingerprints:
        raise DataError(f"none of the SoundFonts ({', '.join(str(p) for p in paths)}) has a guitar preset among GM "
                        f"programs {programs}")
    return instruments


def finish_soundfont_set(set_dir: Path, instruments: list[dict], pitches: list[int], velocities: list[int]) -> Path:
    """examples.json for each split (NSynth's fields, and the SoundFont, program and preset each note came from),
    complete.json, and the summary: how many notes of each instrument were kept."""
    silent = silent_notes(set_dir)
    print(f"{'instrument':22} {'split':6} {'kept':>5} {'silent':>6}  from")
    for split in ("train", "valid", "test"):
        examples = {}
        for inst in (i for i in instruments if i.get("split") == split and "duplicate_of" not in i):
            audio = set_dir / f"{SOUNDFONT_SET}-{split}" / "audio"
            names = sorted(p.stem for p in audio.glob(f"{inst['instrument_str']}-*.wav"))
            for name in names:
                pitch, velocity = (int(x) for x in name.rsplit("-", 2)[1:])
                examples[name] = {
                    "note": len(examples), "note_str": name, "instrument": inst["instrument"],
                    "instrument_str": inst["instrument_str"], "pitch": pitch, "velocity": velocity,
                    "sample_rate": RENDER_RATE, "instrument_family": GUITAR_FAMILY, "instrument_family_str": "guitar",
                    "instrument_source": NSYNTH_SOURCES.index(inst["source"]),
                    "instrument_source_str": inst["source"], "qualities": [0] * 10, "qualities_str": [],
                    "soundfont": inst["soundfont"], "program": inst["program"], "preset": inst["preset"]}
            inst["kept"] = len(names)
            inst["silent"] = sum(n.startswith(inst["instrument_str"] + "-") for n in silent)
            print(f"{inst['instrument_str']:22} {split:6} {inst['kept']:5d} {inst['silent']:6d}  "
                  f"{inst['soundfont']} program {inst['program']} ({inst['preset']})")
        folder = set_dir / f"{SOUNDFONT_SET}-{split}"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "examples.json", lambda f: f.write(json.dumps(examples, indent=1).encode()))
    for inst in (i for i in instruments if "duplicate_of" in i):
        print(f"{inst['soundfont']} program {inst['program']} ({inst['preset']}) sounds like "
              f"{inst['duplicate_of']}: kept once")
    summary = {"instruments": instruments, "pitches": pitches, "velocities": velocities,
               "notes": sum(i.get("kept", 0) for i in instruments),
               "silent": sum(i.get("silent", 0) for i in instruments)}
    atomic_write(set_dir / "complete.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    print(f"{summary['notes']} notes kept, {summary['silent']} silent ones dropped, in {set_dir}")
    return set_dir


def resolve_data(data: str, data_dir: str | Path = "data", synthetic_notes: int = 300, seed: int = 0
                 ) -> dict[str, list[Path]]:
    """--data nsynth-guitar | soundfont-guitar | synthetic | PATH -> {'train': files, 'valid': files}, and 'test'
    where the set has a test split (its instruments are never in train or valid)."""
    if data in ("nsynth-guitar", SOUNDFONT_SET):
        folder = prepare_nsynth(data_dir) if data == "nsynth-guitar" else prepare_soundfont_guitar(data_dir)
        return {split: find_audio(folder / f"{data}-{split}") for split in ("train", "valid", "test")}
    if data == "synthetic":
        return split_folder(synthetic_folder(data_dir, synthetic_notes, seed))
    return split_folder(data)


def synthetic_folder(data_dir: str | Path, num_notes: int, seed: int) -> Path:
    """The synthetic notes of train.py --data synthetic, made once per (number of notes, seed)."""
    return make_synthetic(Path(data_dir) / f"synthetic-{num_notes}-{seed}", num_notes, seed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("nsynth-guitar", "soundfont", "synthetic"), help="which notes to put on disk")
    p.add_argument("--data-dir", default="data", help="where they go (default: data, as train.py's --data-dir)")
    p.add_argument("--notes", type=int, default=300, help="number of synthetic notes (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic notes (default: 0)")
    s = p.add_argument_group("soundfont: guitars rendered from SoundFonts into DATA_DIR/soundfont-guitar")
    s.add_argument("--soundfont", nargs="+", metavar="PATH", default=None,
                   help=f".sf2 or .sf3 files (default: those installed, in {SOUNDFONT_DIRS[0]} and sf3, and "
                        "pretty_midi's TimGM6mb.sf2)")
    s.add_argument("--programs", type=int, nargs="+", choices=sorted(GM_GUITARS), default=DEFAULT_PROGRAMS,
                   metavar="N", help="GM guitar programs: 24 nylon, 25 steel (NSynth's source acoustic), 26 jazz, "
                                     "27 clean, 28 muted, 29 overdriven, 30 distortion, 31 harmonics (electronic) "
                                     "(default: 24-30)")
    s.add_argument("--pitches", type=pitch_list, default=DEFAULT_PITCHES, help="MIDI pitches (default: 40-88)")
    s.add_argument("--velocities", type=velocity_list, default=DEFAULT_VELOCITIES,
                   help="MIDI velocities (default: 25,50,75,100,127)")
    s.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="SoundFonts rendered at once, each in a process of its own (default: 2)")
    args = p.parse_args(argv)
    if args.notes < 1:
        p.error(f"--notes must be at least 1, got {args.notes}")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    try:
        if args.what == "nsynth-guitar":
            folder = prepare_nsynth(args.data_dir)
        elif args.what == "soundfont":
            folder = prepare_soundfont_guitar(args.data_dir, args.soundfont, sorted(set(args.programs)),
                                              args.pitches, args.velocities, args.workers)
        else:
            folder = synthetic_folder(args.data_dir, args.notes, args.seed)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"{len(find_audio(folder))} notes in {folder}")


if __name__ == "__main__":
    main()
