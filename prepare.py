"""
Getting notes onto disk: the reference's NSynth guitar set, and synthetic plucked strings for offline runs.

    python prepare.py nsynth-guitar            # download (335 MB, resumable, checksummed) and extract into data/
    python prepare.py synthetic --notes 300    # write 300 plucked-string notes, NSynth-style names, into data/

train.py calls the same functions for --data nsynth-guitar and --data synthetic (resolve_data), so running this
first is optional; it is here to fetch the data ahead of time, or to look at the synthetic notes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from data import DataError, find_audio, split_folder
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


def resolve_data(data: str, data_dir: str | Path = "data", synthetic_notes: int = 300, seed: int = 0
                 ) -> dict[str, list[Path]]:
    """--data nsynth-guitar | synthetic | PATH -> {'train': files, 'valid': files}."""
    if data == "nsynth-guitar":
        folder = prepare_nsynth(data_dir)
        return {"train": find_audio(folder / "nsynth-guitar-train"), "valid": find_audio(folder / "nsynth-guitar-valid")}
    if data == "synthetic":
        return split_folder(synthetic_folder(data_dir, synthetic_notes, seed))
    return split_folder(data)


def synthetic_folder(data_dir: str | Path, num_notes: int, seed: int) -> Path:
    """The synthetic notes of train.py --data synthetic, made once per (number of notes, seed)."""
    return make_synthetic(Path(data_dir) / f"synthetic-{num_notes}-{seed}", num_notes, seed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("nsynth-guitar", "synthetic"), help="which notes to put on disk")
    p.add_argument("--data-dir", default="data", help="where they go (default: data, as train.py's --data-dir)")
    p.add_argument("--notes", type=int, default=300, help="number of synthetic notes (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic notes (default: 0)")
    args = p.parse_args(argv)
    if args.notes < 1:
        p.error(f"--notes must be at least 1, got {args.notes}")
    try:
        if args.what == "nsynth-guitar":
            folder = prepare_nsynth(args.data_dir)
        else:
            folder = synthetic_folder(args.data_dir, args.notes, args.seed)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"{len(find_audio(folder))} notes in {folder}")


if __name__ == "__main__":
    main()
