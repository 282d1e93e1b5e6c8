"""
Does a note come out at the pitch we asked for? Measure it.

    WAV --read_mono--> samples --estimate_f0--> Hz --cents_error(f0, requested midi)--> cents sharp (+) or flat (-)

- estimate_f0: the pitch of one plucked note. Praat's autocorrelation pitch tracker (Boersma 1993, through the
  praat-parselmouth package) gives one f0 every 10 ms; we skip the attack (its noisy first 0.1 s), look at the
  next 1.9 s and take the median of the voiced frames. `python pitch.py --real` checks it on labelled notes (the
  README gives its score on the 57 real guitar notes in shared/data/real-guitar). No model weights, nothing
  downloaded.
- spectrogram_png: a picture of a note (log-frequency STFT), with the asked and the measured pitch marked.
- pitch_report: all of the above for a list of (WAV, requested MIDI pitch), one line per note and a last line
  "pitch accuracy: N of M within 50 cents".

Command line:
    python pitch.py --real ../shared/data/real-guitar     # check the tracker on labelled notes (metadata.csv)
    python pitch.py FILE.wav --midi 60                     # one (or more) generated notes, PNGs beside them

Needs `pip install praat-parselmouth pillow` (both in requirements.txt; small wheels that depend on numpy only).
They are imported inside the functions that use them, so midi_to_hz and cents_error work without them.
"""
from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

TOLERANCE_CENTS = 50.0    # a note "obeys" when it is within a quarter tone of the asked pitch
FMIN, FMAX = 30.0, 4200.0  # search range in Hz: MIDI 23 to 108, wider than a guitar's
ATTACK_SECONDS = 0.1       # skipped after the onset: the pluck is noise more than pitch
SUSTAIN_SECONDS = 1.9      # then this much is analysed (a generated note is 1.67 s long)
FRAME_SECONDS = 0.01       # one f0 estimate every 10 ms
OCTAVE_COST = 0.025        # Praat's bonus per octave for higher pitch candidates (its default: 0.01). On the 57 real
                           # notes every value from 0.012 to 0.05 gets all of them right; at 0.01 the 2960 Hz note
                           # is taken at 1/5 of its pitch, from 0.06 a G#3 is taken an octave high.
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


# ----------------------------------------------------------------------------------------------------
# A picture of one note

def _magma(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8, black through purple and orange to pale yellow (like matplotlib's 'magma')."""
    stops = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    colours = np.array([[0, 0, 4], [80, 18, 123], [183, 55, 121], [252, 137, 97], [252, 253, 191]])
    return np.stack([np.interp(values, stops, colours[:, c]) for c in range(3)], axis=-1).astype(np.uint8)


def spectrogram_png(audio: np.ndarray, sr: int, path: str | Path, title: str,
                    marks: dict[str, float] | None = None) -> Path:
    """Write a spectrogram of audio to path as a PNG: time across, log frequency (30 Hz to sr/2) up, the top
    80 dB of a 2048 or 4096-point STFT in colour. marks = {label: Hz} draws labelled horizontal lines, e.g. at
    the asked and the measured pitch. Drawn with Pillow (one small package; matplotlib would add 8 more)."""
    Image = _need("PIL.Image", "pillow")
    ImageDraw = _need("PIL.ImageDraw", "pillow")
    ImageFont = _need("PIL.ImageFont", "pillow")
    width, height, left, top, bottom = 640, 320, 56, 26, 22

    # STFT magnitude in dB, frames of at least 80 ms so that 30 to 100 Hz notes are resolved
    n_fft = 1 << math.ceil(math.log2(0.08 * sr))
    hop = n_fft // 8
    audio = np.asarray(audio, dtype=np.float64)
    padded = np.pad(np.nan_to_num(audio), (n_fft // 2, n_fft // 2 + max(0, n_fft - len(audio))))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop] * np.hanning(n_fft)
    db = 20 * np.log10(np.abs(np.fft.rfft(frames, axis=1)).T + 1e-10)  # (bins, frames)
    loudest = max(db.max(), -100.0)  # silence stays black instead of being scaled up to full colour
    db = np.clip((db - loudest + 80) / 80, 0, 1)

    # rows at log-spaced frequencies (top row = highest), interpolated between FFT bins
    f_low, f_high = FMIN, sr / 2
    row_hz = np.geomspace(f_high, f_low, height)
    bin_pos = row_hz / (sr / n_fft)
    lo = np.minimum(bin_pos.astype(int), db.shape[0] - 2)
    frac = (bin_pos - lo)[:, None]
    rows = (1 - frac) * db[lo] + frac * db[lo + 1]
    picture = Image.fromarray(_magma(rows)).resize((width, height), Image.Resampling.BILINEAR)

    canvas = Image.new("RGB", (left + width + 8, top + height + bottom), "white")
    canvas.paste(picture, (left, top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    draw.text((left, 6), title, fill="black", font=font)

    def y_of(hz: float) -> float:
        return top + (math.log(f_high / hz) / math.log(f_high / f_low)) * (height - 1)

    for hz in (50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000):
        if f_low <= hz <= f_high:
            y = y_of(hz)
            draw.line([(left - 4, y), (left, y)], fill="black")
            draw.text((left - 6, y), f"{hz // 1000}k" if hz >= 1000 else str(hz), fill="black", font=font, anchor="rm")
    draw.text((4, top + height // 2), "Hz", fill="black", font=font, anchor="lm")
    seconds = len(audio) / sr
    step = 0.5 if seconds <= 5 else 2.0
    for t in np.arange(0, seconds + 1e-9, step):
        x = left + t / max(seconds, 1e-9) * (width - 1)
        draw.line([(x, top + height), (x, top + height + 4)], fill="black")
        draw.text((x, top + height + 5), f"{t:g} s", fill="black", font=font, anchor="mt")
    for i, ((label, hz), colour) in enumerate(zip((marks or {}).items(), ("white", "cyan", "lime"))):
        if f_low <= hz <= f_high:  # a NaN pitch is not drawn
            y = y_of(hz)
            draw.line([(left, y), (left + width - 1, y)], fill=colour, width=1)
            # labels alternate right and left, so that two marks at the same pitch stay readable
            x, anchor = (left + width - 4, "rb") if i % 2 == 0 else (left + 4, "lb")
            draw.text((x, y - 2), label, fill=colour, font=font, anchor=anchor)
    path = Path(path)
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# Many notes

@dataclass
class NoteResult:
    path: Path
    midi: int               # the requested pitch
    f0: float = math.nan    # the measured pitch in Hz (NaN: none found)
    cents: float = math.nan
    png: Path | None = None
    problem: str = ""       # why the file could not be measured, if it could not

    @property
    def ok(self) -> bool:
        return abs(self.cents) <= TOLERANCE_CENTS  # False for NaN


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


def measure(path: str | Path, midi: int, png_dir: str | Path | None = None, pictures: bool = True) -> NoteResult:
    """Measure one file against its requested MIDI pitch and, if pictures, write its spectrogram PNG
    (into png_dir, or beside the file when png_dir is None). An unreadable file is a result with a problem."""
    path = Path(path)
    result = NoteResult(path, int(midi))
    try:
        audio, sr = read_mono(path)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        result.problem = f"cannot read audio ({e})"
        return result
    result.f0 = estimate_f0(audio, sr)
    result.cents = cents_error(result.f0, midi)
    if pictures:
        png = (Path(png_dir) if png_dir is not None else path.parent) / (path.stem + ".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        title = (f"{path.name}: asked {note_name(result.midi)} ({midi_to_hz(midi):.1f} Hz), "
                 + (f"measured {result.f0:.1f} Hz ({result.cents:+.0f} cents)" if result.f0 > 0 else "no pitch found"))
        result.png = spectrogram_png(audio, sr, png, title,
                                     marks={"asked": midi_to_hz(midi), "measured": result.f0})
    return result


def pitch_report(wav_paths_with_requested_midi, out_dir: str | Path | None = None,
                 pictures: bool = True) -> PitchSummary:
    """For each (audio file, requested MIDI pitch): print file, requested pitch, estimated f0 and the error in
    cents, and write a spectrogram PNG (beside the file, or into out_dir if given). Ends by printing
    "pitch accuracy: N of M within 50 cents" (unreadable or pitchless files count as misses)."""
    notes = []
    print(f"{'file':<48} {'requested':>16} {'estimated f0':>13} {'error':>12}")
    for path, midi in wav_paths_with_requested_midi:
        note = measure(path, midi, out_dir, pictures)
        notes.append(note)
        asked = f"{note_name(note.midi)} {midi_to_hz(note.midi):.1f} Hz"
        if note.problem:
            found, error = note.problem, ""
        elif math.isnan(note.f0):
            found, error = "no pitch", ""
        else:
            found, error = f"{note.f0:.1f} Hz", f"{note.cents:+.1f} cents" + ("" if note.ok else "  MISS")
        print(f"{note.path.name:<48} {asked:>16} {found:>13} {error:>12}", flush=True)
    summary = PitchSummary(notes)
    print(f"median |error|: {summary.median_abs_cents:.1f} cents")
    print(summary.line)
    return summary


def labelled_folder(folder: str | Path) -> list[tuple[Path, int]]:
    """(file, midi_pitch) for every row of folder/metadata.csv (columns 'file' and 'midi_pitch')."""
    folder = Path(folder)
    with open(folder / "metadata.csv", newline="") as f:
        return [(folder / row["file"], int(row["midi_pitch"])) for row in csv.DictReader(f)]


def main(argv=None) -> PitchSummary:
    parser = argparse.ArgumentParser(description="Measure the pitch of notes and compare it with the pitch asked for.")
    parser.add_argument("files", nargs="*", type=Path, help="audio files, all asked to be at --midi")
    parser.add_argument("--midi", type=int, help="the requested MIDI pitch of FILES (60 = C4 = 261.6 Hz)")
    parser.add_argument("--real", type=Path, metavar="FOLDER",
                        help="check the tracker on a labelled folder instead (its metadata.csv has file, midi_pitch)")
    parser.add_argument("--png-dir", type=Path, help="write the spectrogram PNGs here (default: beside each file; "
                                                     "with --real, none unless this is given)")
    args = parser.parse_args(argv)
    if args.real is not None:
        if args.files or args.midi is not None:
            parser.error("give either --real FOLDER or FILES --midi N, not both")
        return pitch_report(labelled_folder(args.real), args.png_dir, pictures=args.png_dir is not None)
    if not args.files or args.midi is None:
        parser.error("give FILES and --midi N (or --real FOLDER)")
    return pitch_report([(f, args.midi) for f in args.files], args.png_dir)


if __name__ == "__main__":
    main()
