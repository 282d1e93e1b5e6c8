"""
From audio files to the token sequences the model trains on:

    audio files --read_audio--> 24 kHz mono --Codec.encode--> codes (levels, frames) --tokenizer--> tokens
                                                  (kept on disk by encode_files)

- Audio: any .wav/.flac/.mp3/.ogg under a folder, read with soundfile, mixed to mono, resampled to 24 kHz and cut or
  zero-padded to a fixed length. A file that cannot be used is skipped with its reason, never fatal.
- Codes: the codec (codec_kinds.py: pretrained EnCodec, untrained, or trained here) encodes each note once; the codes
  are kept in one .npz file per folder and codec (the token cache), and only new or changed files are encoded again.
- Tokens: the train and validation splits of a folder, their NSynth labels, and their token sequences.

Getting notes onto disk (the NSynth download, synthetic plucked strings) is prepare.py's job; laying codes out as
tokens is tokenizer.py's.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from codec import BANDWIDTH_LEVELS, CODEBOOK_SIZE, FRAME_RATE, HOP, SAMPLE_RATE  # noqa: F401 (the codes' shape)
from codec_kinds import Codec
from files import DataError, atomic_write
from tokenizer import NSYNTH_SOURCES, CodecTokenizer

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
DEFAULT_FRAMES = 125     # as the reference: 125 frames = 1.667 s = 250 tokens at 2 levels


# ----------------------------------------------------------------------------------------------------
# Audio files

def find_audio(root: str | Path) -> list[Path]:
    """All audio files under root, recursively, sorted. Symlinked folders are not followed (no loops);
    folders named like audio files are not files and are left out."""
    found = []
    for folder, _, names in os.walk(root):  # os.walk lists folders (and links to them) apart from files
        found.extend(os.path.join(folder, name) for name in names if name.lower().endswith(AUDIO_EXTENSIONS))
    return [Path(f) for f in sorted(found)]


def read_audio(path: str | Path, num_samples: int) -> np.ndarray:
    """The first num_samples of a file at 24 kHz mono float32, zero-padded if the file is shorter.

    Only the part of the file that is needed is read, so long files cost no more than short ones.
    Raises DataError with the reason when the file cannot be used.
    """
    from encodec.utils import convert_audio  # imported here: encodec pulls in torchaudio
    try:
        with open(path, "rb"):  # libsndfile says only "System error" when it cannot open a file; Python says why
            pass
    except OSError as e:
        raise DataError(f"cannot open ({e.strerror})") from None
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            needed = int(np.ceil(num_samples * sr / SAMPLE_RATE)) + 64  # a little extra for the resampler
            audio = f.read(needed, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        # error_string is libsndfile's reason without the "Error opening 'path':" that the summary already shows
        reason = getattr(e, "error_string", None) or str(e)
        if "does not exist" in reason:  # what libsndfile says of an MP3 it cannot parse; the file was opened above
            reason = "damaged, or not the format its name says"
        raise DataError(f"cannot read audio ({reason})") from None
    if audio.size == 0:
        raise DataError("no samples")
    if not np.isfinite(audio).all():
        raise DataError("samples are NaN or infinite")
    mono = torch.from_numpy(audio.mean(axis=1))[None]
    wav = convert_audio(mono, sr, SAMPLE_RATE, 1)[0, :num_samples].numpy()
    return np.pad(wav, (0, num_samples - len(wav)))


def first_notes(files: list[Path], num_samples: int, count: int = 64) -> torch.Tensor:
    """The first `count` readable files as audio (count, num_samples): what an untrained codec is fitted to. None
    readable is a DataError naming the first problem (the others are reported when the split is encoded)."""
    audio, first_problem = [], None
    for f in files:
        if len(audio) == count:
            break
        try:
            audio.append(read_audio(f, num_samples))
        except DataError as e:
            first_problem = first_problem or f"{f}: {e}"
    if not audio:
        raise DataError(f"no readable audio among the {len(files)} training files to fit the untrained codec on "
                        f"(the first: {first_problem})")
    return torch.from_numpy(np.stack(audio))


# ----------------------------------------------------------------------------------------------------
# Encoding, with the token cache

@dataclass
class EncodedFiles:
    codes: np.ndarray                 # (N, levels, frames) uint16, one row per usable file
    files: list[Path]                 # the N files, in row order
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason) for files that were unusable


def encode_files(files: list[Path], codec: Codec, num_frames: int, cache: Path | None = None,
                 batch_size: int | None = None, save_every: float = 60.0, desc: str = "encoding") -> EncodedFiles:
    """The codes of the first num_frames frames of each file: read from the cache file where it has them, the others
    encoded and added to it. The cache is saved every `save_every` seconds too, so that an interrupted run keeps what
    it did. batch_size None: 64 notes a batch on a GPU, 4 on a CPU (where bigger batches are slower per note)."""
    rows = load_cache(cache, codec, num_frames)         # file key -> codes (levels, frames), or why it was skipped
    keys = [file_key(f) for f in files]
    missing = [(f, k) for f, k in zip(files, keys) if isinstance(k, tuple) and k not in rows]
    batch_size = batch_size or (64 if codec.device.type == "cuda" else 4)
    if missing:
        last_save = time.monotonic()
        with tqdm(total=len(missing), desc=desc, unit="file", disable=None) as bar:
            for start in range(0, len(missing), batch_size):
                rows.update(encode_batch(missing[start:start + batch_size], codec, num_frames))
                bar.update(len(missing[start:start + batch_size]))
                if cache is not None and time.monotonic() - last_save > save_every:
                    save_cache(cache, keys, rows, codec, num_frames)
                    last_save = time.monotonic()
        if cache is not None:
            save_cache(cache, keys, rows, codec, num_frames)
    return assemble(files, keys, rows, codec.levels, num_frames)


def file_key(path: Path) -> tuple[str, int, int] | str:
    """(absolute path, size, mtime): a file whose key changed is encoded again. Or why the file cannot be used."""
    try:
        st = os.stat(path)
    except OSError as e:  # vanished, or a broken link
        return f"cannot stat ({e.strerror})"
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def encode_batch(batch: list[tuple[Path, tuple]], codec: Codec, num_frames: int) -> dict:
    """{file key: codes} for the files of batch, {file key: reason} for those that cannot be read."""
    rows, audio = {}, {}
    for f, k in batch:
        try:
            audio[k] = read_audio(f, num_frames * HOP)
        except DataError as e:
            rows[k] = str(e)
    if audio:
        codes = codec.encode(torch.from_numpy(np.stack(list(audio.values())))).cpu().numpy().astype(np.uint16)
        rows.update(zip(audio, codes))
    return rows


def cache_path(cache_dir: str | Path, name: str, files: list[Path], codec: Codec, num_frames: int) -> Path:
    """One cache file per (split name, folder, codec, length): changing any of them uses another file."""
    root = os.path.commonpath({os.path.dirname(os.path.abspath(f)) for f in files}) if files else ""
    key = json.dumps({"root": root, "codec": cache_identity(codec), "frames": num_frames}, sort_keys=True)
    return Path(cache_dir) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"


def cache_identity(codec: Codec) -> dict:
    """The codec's identity without its tensors (their digests stay in it)."""
    return {k: v for k, v in codec.identity().items() if k not in ("codebooks", "weights")}


def load_cache(cache: Path | None, codec: Codec, num_frames: int) -> dict:
    """{file key: codes or the reason it was skipped} of the cache file: empty when there is none, when it holds
    another length or number of levels, or when it cannot be read (then everything is encoded again)."""
    if cache is None or not cache.exists():
        return {}
    try:
        with np.load(cache, allow_pickle=False) as z:
            manifest = json.loads(bytes(z["manifest"]).decode())
            codes = z["codes"]
        if manifest.get("frames") != num_frames or manifest.get("levels") != codec.levels:
            return {}
        return {(e["path"], e["size"], e["mtime_ns"]): e["error"] if e["row"] is None else codes[e["row"]]
                for e in manifest["entries"]}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        print(f"token cache {cache} is unreadable; encoding again", file=sys.stderr)
        return {}


def save_cache(cache: Path, keys: list, rows: dict, codec: Codec, num_frames: int) -> None:
    """The rows of these files as one .npz file: uint16 codes and a JSON manifest of each file's key and row (or the
    reason it was skipped). Written atomically, as every file is."""
    entries, arrays = [], []
    for k in keys:
        if not isinstance(k, tuple) or k not in rows:
            continue
        entry = {"path": k[0], "size": k[1], "mtime_ns": k[2], "row": None, "error": None}
        if isinstance(rows[k], str):
            entry["error"] = rows[k]
        else:
            entry["row"] = len(arrays)
            arrays.append(rows[k])
        entries.append(entry)
    manifest = {"version": 1, "frames": num_frames, "levels": codec.levels, "codec": cache_identity(codec),
                "entries": entries}
    codes = np.stack(arrays) if arrays else np.zeros((0, codec.levels, num_frames), np.uint16)
    manifest_bytes = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda f: np.savez(f, codes=codes.astype(np.uint16), manifest=manifest_bytes))


def assemble(files: list[Path], keys: list, rows: dict, levels: int, num_frames: int) -> EncodedFiles:
    """The codes of the usable files in their order, and the others with the reason they were skipped."""
    used, codes, skipped = [], [], []
    for f, k in zip(files, keys):
        value = k if isinstance(k, str) else rows[k]
        if isinstance(value, str):
            skipped.append((f, value))
        else:
            used.append(f)
            codes.append(value)
    codes = np.stack(codes) if codes else np.zeros((0, levels, num_frames), np.uint16)
    return EncodedFiles(codes, used, skipped)


def report_skipped(name: str, encoded: EncodedFiles, show: int = 20) -> None:
    """Print how many files of a split were skipped and why (the first `show` of them)."""
    if not encoded.skipped:
        return
    total = len(encoded.skipped) + len(encoded.files)
    print(f"{name}: skipped {len(encoded.skipped)} of {total} files that could not be used:")
    for path, reason in encoded.skipped[:show]:
        print(f"  {path}: {reason}")
    if len(encoded.skipped) > show:
        print(f"  ... and {len(encoded.skipped) - show} more")


# ----------------------------------------------------------------------------------------------------
# NSynth labels

def labels_of(files: list[Path]) -> list[dict]:
    """nsynth_labels of each file, with the examples.json of their folders."""
    examples = {}
    for folder in sorted({f.parent for f in files}):
        examples.update(load_examples_json(folder) or {})
    return [nsynth_labels(f, examples) for f in files]


_NSYNTH_NAME = re.compile(r"^(?P<family>[a-z]+)_(?P<source>acoustic|electronic|synthetic)_(?P<inst>\d+)"
                          r"-(?P<pitch>\d+)-(?P<velocity>\d+)$")


def nsynth_labels(path: Path, examples: dict | None = None) -> dict:
    """pitch (MIDI), velocity and instrument source (index into NSYNTH_SOURCES) of an NSynth-named file,
    from examples.json when given, else from the name; -1 where unknown."""
    note = path.stem
    if examples and note in examples:
        e = examples[note]
        return {"pitch": int(e["pitch"]), "velocity": int(e["velocity"]), "source": int(e["instrument_source"])}
    m = _NSYNTH_NAME.match(note)
    if not m:
        return {"pitch": -1, "velocity": -1, "source": -1}
    return {"pitch": int(m["pitch"]), "velocity": int(m["velocity"]), "source": NSYNTH_SOURCES.index(m["source"])}


def load_examples_json(folder: Path) -> dict | None:
    """NSynth's examples.json (one dict keyed by note name) in folder or its parent, if there is one."""
    for candidate in (folder / "examples.json", folder.parent / "examples.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, ValueError) as e:
                print(f"ignoring {candidate}: {e}", file=sys.stderr)
    return None


# ----------------------------------------------------------------------------------------------------
# Datasets

def split_folder(root: str | Path, valid_fraction: float = 0.05) -> dict[str, list[Path]]:
    """Train and validation files of a folder: its subfolders named *train* and *valid* when it has both,
    otherwise a deterministic split by file name (about valid_fraction of the files, at least one)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder (or use nsynth-guitar or synthetic)")
    subs = [p for p in sorted(root.iterdir()) if p.is_dir()]
    train = [p for p in subs if "train" in p.name.lower()]
    valid = [p for p in subs if "valid" in p.name.lower()]
    if train and valid:
        return {"train": [f for d in train for f in find_audio(d)], "valid": [f for d in valid for f in find_audio(d)]}
    files = find_audio(root)
    if not files:
        raise DataError(f"--data {root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in it")
    # crc32 of the name: stable across runs and machines, unlike Python's hash()
    is_valid = [zlib.crc32(f.name.encode()) % 10_000 < valid_fraction * 10_000 for f in files]
    if not any(is_valid) and len(files) > 1:
        is_valid[-1] = True
    return {"train": [f for f, v in zip(files, is_valid) if not v] or files,
            "valid": [f for f, v in zip(files, is_valid) if v] or files}


def usable_splits(train: EncodedFiles, valid: EncodedFiles, data: str, verbose: bool = True
                  ) -> tuple[EncodedFiles, EncodedFiles]:
    """The encoded splits, each with at least one note. No readable training note is a DataError naming --data; with
    no readable validation note (in a small messy folder the one file picked may be the bad one) the last training
    note validates instead."""
    if len(train.files) == 0:
        raise DataError(f"no readable audio in the train split of --data {data} ({len(train.skipped)} files, "
                        "all skipped)")
    if len(valid.files) == 0:
        if verbose:
            print(f"valid: none of its {len(valid.skipped)} files could be used; validating on {train.files[-1]} "
                  "instead")
        valid = EncodedFiles(train.codes[-1:], train.files[-1:], valid.skipped)
        if len(train.files) > 1:
            train = EncodedFiles(train.codes[:-1], train.files[:-1], train.skipped)
    return train, valid


class TokenDataset:
    """The token sequences of encoded notes (tokens: one row per note, BOS first), with the NSynth labels of each
    note (-1 where unknown), which are also in the tokens when the tokenizer has condition tokens."""

    def __init__(self, encoded: EncodedFiles, tokenizer: CodecTokenizer):
        self.files = encoded.files
        labels = labels_of(self.files)
        self.pitch = torch.tensor([l["pitch"] for l in labels], dtype=torch.long)
        self.velocity = torch.tensor([l["velocity"] for l in labels], dtype=torch.long)
        self.source = torch.tensor([l["source"] for l in labels], dtype=torch.long)
        self.tokens = tokenizer.encode(torch.from_numpy(encoded.codes.astype(np.int64)),
                                       self.pitch, self.velocity, self.source)

    def __len__(self) -> int:
        return len(self.tokens)
