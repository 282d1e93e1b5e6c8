"""
Judge folders of notes as the papers of this field do, side by side with real notes: a note classifier's scores
(GANSynth, Engel et al. 2019), the distance between feature distributions, and CREPE's pitch (DDSP, Engel et al. 2020).

    python evaluate.py samples/                               # one row per folder, under the real notes' row
    python evaluate.py samples-delay/ samples-flatten/ --json scores.json
    python evaluate.py --write-floors floors/                 # the floors: white noise, the real notes a semitone up

The first row is the real held-out notes (the test split of --data, whose instruments the classifier never heard, or
--real FOLDER): the ceiling every other row is read against. Every note is read as its first 1.667 s at 24 kHz mono
(the length the language model makes) and judged against the pitch and source it was asked for:

- PA, PE, source accuracy: a small CNN on log-mel frames (NoteClassifier) predicts a note's pitch (128 MIDI numbers,
  as NSynth's pitch classifier that GANSynth used) and source (acoustic, electronic). It is trained once on the
  training split and cached beside the data (DATA_DIR/soundfont-guitar/classifier.pt), with its own accuracy on the
  test split. PA: the share of notes whose predicted pitch is the asked one; PE: the mean entropy of its pitch
  predictions in nats (lower: a clearer pitch); source accuracy: the share whose predicted source is the asked one.
- FID: the Frechet distance between Gaussians fitted to the classifier's penultimate features of the folder and of
  the real notes (0 for the real notes themselves).
- NDB/K (Richardson and Weiss 2018): the training notes' log-mel spectrograms are put into K = 50 bins by k-means;
  the share of bins that hold a significantly different share of the folder's notes (two-proportion z-test, 5%).
- CREPE, DDSP's way (pitch.py): Viterbi-decoded f0 on the frames of confidence >= 0.85; raw pitch accuracy (the share
  of those frames within 50 cents of the asked pitch), mean f0 error in semitones, the share of outlier notes (no
  confident frame, or off by over 12 semitones); Praat's share within 50 cents beside it, and the notes on which
  the two trackers disagree named.

What a note was asked, in this order: the examples.json in its folder or the one above (NSynth's labels); its
NSynth-style name (guitar_acoustic_014-048-100: pitch 48, velocity 100, acoustic); sample.py's names
(sample_pitch60_vel25_acoustic_0.wav; the velocity and source are there when several were asked). A note without an
asked pitch counts in PE, FID and NDB only; one without an asked source is left out of the source accuracy.

docs/evaluation.md: each metric, its citation, and the table measured on the real notes and the floors.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cli import run_or_exit
from codec import kmeans, nearest
from data import (DEFAULT_FRAMES, HOP, SAMPLE_RATE, DataError, find_audio, load_examples_json,
                  nsynth_labels, read_audio)
from files import atomic_write
from pitch import CREPE_MODEL, NoteResult, PitchSummary, track
from prepare import resolve_data
from tokenizer import NSYNTH_SOURCES

CLIP = DEFAULT_FRAMES * HOP        # 40,000 samples = 1.667 s at 24 kHz: every note is judged on this much
MIN_SECONDS = 0.5                  # a shorter note is refused (its clip would be mostly the padding)
SILENT_PEAK = 1e-3                 # -60 dBFS: a quieter note is refused as silent
N_FFT, MEL_HOP, MELS = 2048, 512, 128
F_MIN, F_MAX = 30.0, 8000.0        # 8 kHz: the Nyquist frequency of the 16 kHz sets, so both sides see one band
PITCHES = 128                      # MIDI numbers, as NSynth's pitch classifier
SOURCES = NSYNTH_SOURCES[:2]       # acoustic, electronic (the guitar sets have no synthetic notes)
NDB_BINS = 50                      # K, as GANSynth reports NDB/K
NDB_SIGNIFICANCE = 0.05
EPOCHS, BATCH_SIZE, LEARNING_RATE = 12, 32, 2e-3
CLASSIFIER_KIND, CLASSIFIER_VERSION = "codecgpt-note-classifier", 1
SAMPLE_NAME = re.compile(r"_pitch(?P<pitch>\d+)(?:_vel(?P<velocity>\d+))?(?:_(?P<source>acoustic|electronic|synthetic))?"
                         r"(?:_\d+)?$")


# ----------------------------------------------------------------------------------------------------
# The note classifier

class NoteClassifier(nn.Module):
    """A note's log-mel spectrogram (N, MELS, frames) in dB -> pitch logits (N, 128) and source logits (N, 2), both
    read from one embedding (the penultimate layer, whose features FID compares). The spectrogram is taken relative
    to its loudest bin, so loudness is left out; four conv blocks halve frequency and time; the maximum over time
    keeps, per band, the loudest moment: where in frequency the energy is, which is what pitch is."""

    def __init__(self, width: int = 16, embedding: int = 128):
        super().__init__()
        block = lambda c_in, c_out: nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                                                  nn.ReLU(), nn.MaxPool2d(2))
        self.convs = nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, 4 * width),
                                   block(4 * width, 4 * width))
        self.embed = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * width * (MELS // 16), embedding), nn.ReLU())
        self.pitch = nn.Linear(embedding, PITCHES)
        self.source = nn.Linear(embedding, len(SOURCES))

    def features(self, mel_db: torch.Tensor) -> torch.Tensor:
        x = (mel_db - mel_db.amax(dim=(1, 2), keepdim=True)).clamp(min=-80) / 80 + 1   # 0 (80 dB down) .. 1
        x = self.convs(x[:, None]).amax(dim=3)                                          # (N, channels, MELS / 16)
        return self.embed(x.flatten(1))

    def forward(self, mel_db: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.features(mel_db)
        return self.pitch(e), self.source(e)


def log_mel(audio: np.ndarray) -> torch.Tensor:
    """(N, CLIP) samples at 24 kHz -> (N, MELS, frames) power in dB, floored at -100 dB."""
    from torchaudio.transforms import MelSpectrogram
    mel = MelSpectrogram(SAMPLE_RATE, n_fft=N_FFT, hop_length=MEL_HOP, n_mels=MELS, f_min=F_MIN, f_max=F_MAX)
    x = torch.from_numpy(audio)
    return torch.cat([10 * torch.log10(mel(chunk) + 1e-10).clamp(min=-100) for chunk in x.split(256)])


@dataclass
class Judge:
    """What evaluate.py scores with: the trained classifier and the NDB bins of the training notes."""
    model: NoteClassifier
    ndb_bins: torch.Tensor     # (NDB_BINS, MELS * frames): k-means centroids of the training notes' log-mel
    ndb_counts: np.ndarray     # (NDB_BINS,): how many training notes each bin holds
    accuracy: dict             # the classifier's own accuracy: {"pitch", "source", "notes"} on the test split


def train_classifier(splits: dict[str, list[Path]], path: Path) -> Judge:
    """Train the note classifier on splits["train"] (keeping the epoch best on "valid"), fit the NDB bins, measure it
    on "test" and save it all to path."""
    start, cpu = time.time(), time.process_time()
    print(f"training the note classifier on {len(splits['train'])} notes ({path})")
    notes = {split: read_notes(files, f"{split} split") for split, files in splits.items()}
    train = notes["train"]
    torch.manual_seed(0)
    model = NoteClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-2)
    pitch, source = torch.from_numpy(train.pitch), torch.from_numpy(train.source)
    best = (-1.0, None)
    for epoch in range(EPOCHS):
        model.train()
        for batch in torch.randperm(len(pitch)).split(BATCH_SIZE):
            pitch_logits, source_logits = model(train.mel[batch])
            loss = F.cross_entropy(pitch_logits, pitch[batch]) + F.cross_entropy(source_logits, source[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        valid = classifier_accuracy(model, notes["valid"])
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {loss.item():.3f}, valid pitch {100 * valid['pitch']:.1f}%, "
              f"source {100 * valid['source']:.1f}%", flush=True)
        if valid["pitch"] + valid["source"] > best[0]:
            best = (valid["pitch"] + valid["source"], {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    bins = kmeans(train.mel.flatten(1), NDB_BINS, iters=30, gen=torch.Generator().manual_seed(0))
    counts = np.bincount(nearest(train.mel.flatten(1), bins).numpy(), minlength=NDB_BINS)
    judge = Judge(model.eval(), bins, counts, classifier_accuracy(model, notes["test"]))
    save_checkpoint({"kind": CLASSIFIER_KIND, "version": CLASSIFIER_VERSION, "trained_on": notes_key(splits["train"]),
                     "model": model.state_dict(), "ndb_bins": bins, "ndb_counts": torch.from_numpy(counts),
                     "accuracy": judge.accuracy, "train_seconds": round(time.time() - start, 1),
                     "cpu_seconds": round(time.process_time() - cpu, 1)}, path)
    print(f"trained in {time.time() - start:.0f} s ({time.process_time() - cpu:.0f} s of CPU time)")
    return judge


@torch.no_grad()
def classifier_accuracy(model: NoteClassifier, notes: Notes) -> dict:
    pitch_probs, source_probs, _ = predict(model, notes)
    return {"pitch": pitch_accuracy(pitch_probs, notes.pitch), "source": source_accuracy(source_probs, notes.source),
            "notes": len(notes.paths)}


@torch.no_grad()
def predict(model: NoteClassifier, notes: Notes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classifier's pitch probabilities (N, 128), source probabilities (N, 2) and penultimate features."""
    model.eval()
    features = torch.cat([model.features(chunk) for chunk in notes.mel.split(256)])
    return (model.pitch(features).softmax(-1).numpy(), model.source(features).softmax(-1).numpy(),
            features.double().numpy())


def notes_key(files: list[Path]) -> str:
    """What a cached classifier was trained on: the training files' names and sizes."""
    import hashlib
    return hashlib.sha256(json.dumps([[f.name, f.stat().st_size] for f in files]).encode()).hexdigest()[:16]


def load_or_train(path: Path, splits: dict[str, list[Path]], retrain: bool = False) -> Judge:
    """The cached classifier at path, or one trained now when there is none, when it was trained on other notes,
    or when it is damaged (refused in one line)."""
    if path.exists() and not retrain:
        try:
            saved = load_checkpoint(path)
            if saved.get("kind") != CLASSIFIER_KIND or saved.get("version") != CLASSIFIER_VERSION:
                raise CheckpointError(f"{path}: not a note classifier of this evaluate.py")
            model = NoteClassifier()
            model.load_state_dict(saved["model"])
            if saved["trained_on"] == notes_key(splits["train"]):
                return Judge(model.eval(), saved["ndb_bins"], saved["ndb_counts"].numpy(), saved["accuracy"])
            print(f"{path} was trained on other notes than {len(splits['train'])} of the training split now")
        except (CheckpointError, KeyError, RuntimeError, AttributeError) as e:
            print(f"refusing the cached note classifier: {str(e).splitlines()[0]}", file=sys.stderr)
    return train_classifier(splits, path)


# ----------------------------------------------------------------------------------------------------
# Reading a folder of notes, and what each was asked

@dataclass
class Notes:
    """The usable notes of a folder: their first CLIP samples, log-mel, and what each was asked (-1: unknown)."""
    paths: list[Path]
    audio: np.ndarray      # (N, CLIP) float32 at 24 kHz
    mel: torch.Tensor      # (N, MELS, frames) dB
    pitch: np.ndarray      # (N,) MIDI pitch
    velocity: np.ndarray   # (N,) MIDI velocity
    source: np.ndarray     # (N,) index into NSYNTH_SOURCES
    skipped: int           # files that could not be used (each named on stderr)


def asked(path: Path, examples: dict | None) -> dict:
    """{"pitch", "velocity", "source"} asked of a note (-1 where unknown): from examples.json, else an NSynth-style
    name, else a name of sample.py."""
    labels = nsynth_labels(path, examples)
    match = SAMPLE_NAME.search(path.stem)
    if labels["pitch"] < 0 and match:
        labels = {"pitch": int(match["pitch"]), "velocity": int(match["velocity"] or -1),
                  "source": NSYNTH_SOURCES.index(match["source"]) if match["source"] else -1}
    return labels


def read_note(path: Path) -> np.ndarray:
    """A note's first CLIP samples at 24 kHz (zero-padded); DataError saying why it cannot be judged."""
    audio = read_audio(path, CLIP)   # refuses unreadable, empty and NaN files
    seconds = sf.info(str(path)).duration
    if seconds < MIN_SECONDS:
        raise DataError(f"too short ({seconds:.2f} s; a note needs at least {MIN_SECONDS} s)")
    if not np.abs(audio).max() >= SILENT_PEAK:
        raise DataError(f"silent (peak below {20 * math.log10(SILENT_PEAK):.0f} dBFS)")
    return audio


def read_notes(files: list[Path], what: str) -> Notes:
    """Read files as notes: each one that cannot be judged is named on stderr with the reason, the others kept.
    DataError when none can."""
    examples = {}
    for folder in sorted({f.parent for f in files}):
        examples.update(load_examples_json(folder) or {})
    kept, audio, labels = [], [], []
    for path in tqdm(files, desc=f"reading {what}", unit="note", disable=None, leave=False):
        try:
            audio.append(read_note(path))
        except DataError as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        kept.append(path)
        labels.append(asked(path, examples))
    if not kept:
        raise DataError(f"{what}: none of its {len(files)} audio files can be judged" if files else
                        f"{what}: no audio files in it")
    audio = np.stack(audio)
    column = lambda key: np.array([label[key] for label in labels], dtype=np.int64)
    return Notes(kept, audio, log_mel(audio), column("pitch"), column("velocity"), column("source"),
                 len(files) - len(kept))


def read_folder(folder: Path) -> Notes:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    return read_notes(find_audio(folder), str(folder))


# ----------------------------------------------------------------------------------------------------
# The metrics, one function each

def pitch_accuracy(pitch_probs: np.ndarray, asked_pitch: np.ndarray) -> float:
    """PA: the share of the notes with an asked pitch whose most likely predicted pitch is that pitch."""
    known = asked_pitch >= 0
    return float(np.mean(pitch_probs[known].argmax(1) == asked_pitch[known])) if known.any() else math.nan


def pitch_entropy(pitch_probs: np.ndarray) -> float:
    """PE: the mean entropy of the classifier's pitch distribution for each note, in nats (0: certain)."""
    return float(np.mean(-(pitch_probs * np.log(np.clip(pitch_probs, 1e-12, 1))).sum(1)))


def source_accuracy(source_probs: np.ndarray, asked_source: np.ndarray) -> float:
    """The share of the notes asked to be acoustic or electronic that the classifier says are."""
    known = (asked_source >= 0) & (asked_source < len(SOURCES))
    return float(np.mean(source_probs[known].argmax(1) == asked_source[known])) if known.any() else math.nan


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's distance between Gaussians fitted to two sets of features (N, D): |mu_a - mu_b|^2 + tr(S_a) + tr(S_b)
    - 2 tr((S_a S_b)^1/2). The last trace is the sum of the square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2,
    a symmetric matrix, which keeps it real and stable."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    distance = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    return float(max(distance, 0.0))


def ndb_k(mel: torch.Tensor, bins: torch.Tensor, train_counts: np.ndarray) -> float:
    """NDB/K: the share of the K bins whose share of these notes differs from the training notes' share by a
    two-sided two-proportion z-test at NDB_SIGNIFICANCE (Richardson and Weiss 2018)."""
    counts = np.bincount(nearest(mel.flatten(1), bins).numpy(), minlength=len(bins))
    n1, n2 = train_counts.sum(), counts.sum()
    p1, p2 = train_counts / n1, counts / n2
    pooled = (train_counts + counts) / (n1 + n2)
    z = np.abs(p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2)).clip(min=1e-12)
    p_values = np.array([math.erfc(value / math.sqrt(2)) for value in z])
    return float(np.mean(p_values < NDB_SIGNIFICANCE))


def pitch_trackers(notes: Notes, crepe: str) -> PitchSummary:
    """Praat's and CREPE's pitch of every note with an asked pitch (pitch.track): the summary's crepe_rpa,
    crepe_error_semitones, crepe_outliers and within are DDSP's f0 scores and Praat's."""
    results = []
    asked_pitch = [i for i in range(len(notes.paths)) if notes.pitch[i] >= 0]
    for i in tqdm(asked_pitch, desc="tracking pitch", unit="note", disable=None, leave=False):
        results.append(track(NoteResult(notes.paths[i], int(notes.pitch[i])), notes.audio[i], SAMPLE_RATE, crepe))
    return PitchSummary(results)


def score(notes: Notes, judge: Judge, real_features: np.ndarray, crepe: str) -> dict:
    """A folder's row: the pinned --json names (and what the table adds: skipped notes, the trackers' disputes)."""
    pitch_probs, source_probs, features = predict(judge.model, notes)
    trackers = pitch_trackers(notes, crepe)
    return {"notes": len(notes.paths), "pa": pitch_accuracy(pitch_probs, notes.pitch),
            "pe": pitch_entropy(pitch_probs), "source_accuracy": source_accuracy(source_probs, notes.source),
            "fid": frechet_distance(features, real_features), "ndb_k": ndb_k(notes.mel, judge.ndb_bins, judge.ndb_counts),
            "crepe_rpa": trackers.crepe_rpa, "crepe_f0_error_semitones": trackers.crepe_error_semitones,
            "crepe_outliers": trackers.crepe_outliers,
            "praat_within_50_cents": trackers.within / trackers.total if trackers.total else math.nan,
            "skipped": notes.skipped, "trackers_disagree": [n.path.name for n in trackers.notes if n.trackers_disagree]}


# ----------------------------------------------------------------------------------------------------
# The floors, the table, the program

def write_floors(real: Notes, out_dir: Path) -> list[Path]:
    """Two folders named and labelled as the real notes: white noise (out_dir/noise) and the real notes transposed
    a semitone up (out_dir/transposed), each note asked for what the real one was. Returns the two folders."""
    rng = np.random.default_rng(0)
    floors = {"noise": lambda x: (0.1 * rng.standard_normal(CLIP)).clip(-1, 1),
              "transposed": lambda x: np.interp(np.arange(CLIP) * 2 ** (1 / 12), np.arange(CLIP), x, right=0.0)}
    examples = {p.stem: {"pitch": int(pi), "velocity": int(v), "instrument_source": int(s)}
                for p, pi, v, s in zip(real.paths, real.pitch, real.velocity, real.source)}
    for name, make in floors.items():
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for path, audio in zip(real.paths, real.audio):
            atomic_write(folder / f"{path.stem}.wav", lambda f: sf.write(f, make(audio).astype(np.float32),
                                                                          SAMPLE_RATE, subtype="PCM_16", format="WAV"))
        atomic_write(folder / "examples.json", lambda f: f.write(json.dumps(examples).encode()))
    return [out_dir / name for name in floors]


COLUMNS = [("notes", "notes", "{:.0f}"), ("pa", "PA", "{:.1%}"), ("pe", "PE", "{:.2f}"),
           ("source_accuracy", "source", "{:.1%}"), ("fid", "FID", "{:.2f}"), ("ndb_k", "NDB/K", "{:.2f}"),
           ("crepe_rpa", "CREPE RPA", "{:.1%}"), ("crepe_f0_error_semitones", "f0 error", "{:.2f}"),
           ("crepe_outliers", "outliers", "{:.1%}"), ("praat_within_50_cents", "Praat", "{:.1%}")]


def print_table(rows: dict[str, dict]) -> None:
    """One line per folder, the real notes first; then the notes on which the two pitch trackers disagree."""
    width = max(len(name) for name in rows)
    print(f"{'folder':<{width}}" + "".join(f"{title:>11}" for _, title, _ in COLUMNS))
    for name, row in rows.items():
        cells = ["-" if row[key] is None or math.isnan(row[key]) else form.format(row[key]) for key, _, form in COLUMNS]
        print(f"{name:<{width}}" + "".join(f"{cell:>11}" for cell in cells))
    for name, row in rows.items():
        if row["trackers_disagree"]:
            names = row["trackers_disagree"]
            print(f"Praat and CREPE disagree on {len(names)} of {row['notes']} notes of {name}: "
                  + ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""))


def evaluate(args) -> dict[str, dict]:
    """Score the real notes and every folder; print the table and write --json. Returns the rows."""
    splits = resolve_data(args.data, args.data_dir)
    judge = load_or_train(Path(args.classifier or Path(args.data_dir) / args.data / "classifier.pt"), splits,
                          args.retrain)
    print(f"note classifier: pitch {judge.accuracy['pitch']:.1%}, source {judge.accuracy['source']:.1%} on the "
          f"{judge.accuracy['notes']} notes of the test split")
    real_name = str(args.real or Path(args.data_dir) / args.data / f"{args.data}-test")
    real = read_folder(Path(real_name)) if args.real else read_notes(splits["test"], real_name)
    folders = list(args.folders) + (write_floors(real, args.write_floors) if args.write_floors else [])
    start = time.time()
    real_features = predict(judge.model, real)[2]
    rows = {f"{real_name} (real)": score(real, judge, real_features, args.crepe)}
    unusable = []
    for folder in folders:
        try:
            rows[str(folder)] = score(read_folder(Path(folder)), judge, real_features, args.crepe)
        except DataError as e:
            print(f"skipping {e}", file=sys.stderr)
            unusable.append(folder)
    print_table(rows)
    print(f"scored {sum(row['notes'] for row in rows.values())} notes in {time.time() - start:.0f} s")
    if args.json:
        finite = lambda v: None if isinstance(v, float) and math.isnan(v) else v
        rows_json = {name: {key: finite(value) for key, value in row.items()} for name, row in rows.items()}
        atomic_write(args.json, lambda f: f.write(json.dumps(rows_json, indent=1).encode()))
    if unusable:
        raise DataError(f"{len(unusable)} of the folders could not be scored (each named above)")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", type=Path, help="folders of notes to score, one row each")
    p.add_argument("--json", type=Path, help="also write the rows to this file: per folder, notes, pa, pe, "
                                             "source_accuracy, fid, ndb_k, crepe_rpa, crepe_f0_error_semitones, "
                                             "crepe_outliers, praat_within_50_cents (shares from 0 to 1)")
    p.add_argument("--data", choices=("soundfont-guitar", "nsynth-guitar"), default="soundfont-guitar",
                   help="the set whose training split trains the classifier and whose test split is the first row "
                        "(default: soundfont-guitar, rendered by prepare.py soundfont when missing)")
    p.add_argument("--data-dir", default="data", help="where --data is (default: data, as train.py's)")
    p.add_argument("--real", type=Path, help="another folder of real held-out notes for the first row (default: the "
                                             "test split of --data)")
    p.add_argument("--classifier", type=Path, help="the cached classifier (default: DATA_DIR/DATA/classifier.pt)")
    p.add_argument("--retrain", action="store_true", help="train the classifier again even when it is cached")
    p.add_argument("--crepe", choices=("tiny", "full"), default=CREPE_MODEL,
                   help=f"CREPE's network (default: {CREPE_MODEL}; full is DDSP's, about 30 times slower on a CPU)")
    p.add_argument("--write-floors", type=Path, metavar="DIR",
                   help="write DIR/noise (white noise) and DIR/transposed (the real notes a semitone up), named and "
                        "labelled as the real notes, and score them after FOLDERS")
    args = p.parse_args(argv)
    if not args.folders and not args.write_floors:
        p.error("give folders of notes to score (or --write-floors DIR)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    run_or_exit(lambda: evaluate(args))


if __name__ == "__main__":
    main()
