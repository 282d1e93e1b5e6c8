"""
From audio files to the token sequences the model trains on.

    audio files --read_audio--> 24 kHz mono --Codec.encode--> codes (levels, frames) --tokenizer--> tokens
                                                   (cached on disk by encode_files)

- Audio: any .wav/.flac/.mp3/.ogg under a folder, read with soundfile, mixed to mono, resampled to 24 kHz and
  cut or zero-padded to a fixed length. Files that cannot be read are skipped with their reason, never fatal.
- Codec: the pretrained EnCodec 24 kHz model (downloaded once), or an untrained one whose codebooks are fitted
  by k-means on the data, for offline runs and tests.
- Token cache: encoding is the slow part, so codes are stored once per folder and codec in one .npz file
  (uint16 codes + a JSON manifest of file sizes and mtimes); changed or new files are encoded again.
- Datasets: the train and validation files of a folder, and their token sequences with NSynth labels.

Getting notes onto disk in the first place (the NSynth download, synthetic plucked strings) is prepare.py's job;
laying codes out as tokens is tokenizer.py's.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import urllib.error
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from checkpoint import CheckpointError, digest, load_checkpoint
from files import atomic_write
from tokenizer import NSYNTH_SOURCES, CodecTokenizer

SAMPLE_RATE = 24_000     # EnCodec 24 kHz
FRAME_RATE = 75          # codec frames per second (hop of 320 samples)
HOP = SAMPLE_RATE // FRAME_RATE
BANDWIDTH_LEVELS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}   # kbps -> number of codebooks (levels)
CODEBOOK_SIZE = 1024     # codes per codebook (CodecTokenizer's codebook_size)
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
DEFAULT_FRAMES = 125     # like the reference: 125 frames = 1.667 s = 250 tokens at 2 levels


class DataError(Exception):
    """A problem with the user's data or settings, reported as one message (no traceback)."""


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


# ----------------------------------------------------------------------------------------------------
# The codec

def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (k, D) for each row of x (N, D), from |x|^2 - 2 x.c + |c|^2: one matmul
    (EnCodec's own k-means builds an (N, k, D) tensor, too big for a real data set)."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)).argmin(1)


def _kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Plain k-means on x (N, D) -> centroids (k, D)."""
    centroids = x[torch.randint(len(x), (k,), generator=generator)]
    for _ in range(iters):
        assign = _nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0  # an empty cluster restarts at a random point
        centroids = torch.where(empty[:, None], x[torch.randint(len(x), (k,), generator=generator)],
                                sums / counts.clamp(min=1)[:, None])
    return centroids


class Codec:
    """EnCodec 24 kHz at a fixed bandwidth: audio (B, samples) <-> codes (B, levels, frames).

    kind 'pretrained': Meta's released weights. kind 'untrained': the same network with random weights
    (from a fixed seed) whose codebooks are fitted to the data by k-means. An untrained EnCodec maps all audio
    to code 0, because its codebooks start at zero and are only filled in training mode; fitting them makes the
    codes carry information, so the whole pipeline can run and be tested offline. kind 'trained': a codec of
    codec.py trained by train_codec.py (Codec.load reads its file), the same codes, notes you can hear.
    """

    def __init__(self, model, kind: str, bandwidth: float, seed: int | None = None):
        self.model, self.kind, self.bandwidth, self.seed = model, kind, bandwidth, seed
        self.levels = BANDWIDTH_LEVELS[bandwidth]
        model.set_target_bandwidth(bandwidth)
        model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def check_bandwidth(bandwidth: float) -> float:
        if bandwidth not in BANDWIDTH_LEVELS:
            raise DataError(f"--bandwidth must be one of {sorted(BANDWIDTH_LEVELS)} kbps, got {bandwidth}")
        return float(bandwidth)

    @classmethod
    def pretrained(cls, bandwidth: float = 1.5, weights: str | Path | None = None) -> Codec:
        """The released EnCodec 24 kHz weights: downloaded (and cached by torch.hub) or read from `weights`."""
        from encodec import EncodecModel
        bandwidth = cls.check_bandwidth(bandwidth)
        with warnings.catch_warnings():  # encodec uses the deprecated torch.nn.utils.weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            if weights is None:
                try:
                    model = EncodecModel.encodec_model_24khz()
                except (urllib.error.URLError, OSError, RuntimeError) as e:
                    raise DataError(
                        f"Could not get the pretrained EnCodec weights (encodec_24khz-d7cc33bc.th): {e}. "
                        "They are downloaded once by EncodecModel.encodec_model_24khz() and cached in "
                        "~/.cache/torch/hub/checkpoints. To fix: run once on a machine with internet access, or "
                        "download the file elsewhere and pass --codec-weights PATH. Without it, --codec untrained "
                        "runs the whole pipeline offline with an untrained codec fitted to your data (the audio "
                        "will not sound like the training notes).") from None
            else:
                model = EncodecModel.encodec_model_24khz(pretrained=False)
                try:
                    state = torch.load(weights, map_location="cpu", weights_only=True)
                    model.load_state_dict(state)
                except Exception as e:  # missing, truncated, or not EnCodec 24 kHz weights
                    raise DataError(f"--codec-weights {weights}: not usable EnCodec 24 kHz weights ({e})") from None
        return cls(model, "pretrained", bandwidth)

    @classmethod
    def untrained(cls, bandwidth: float = 1.5, seed: int = 0, codebooks: torch.Tensor | None = None) -> Codec:
        """EnCodec with random weights from `seed`; codebooks (levels, 1024, 128) as fitted before, or None
        to call fit() next."""
        from encodec import EncodecModel
        bandwidth = cls.check_bandwidth(bandwidth)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.manual_seed(seed)
            model = EncodecModel.encodec_model_24khz(pretrained=False)
        codec = cls(model, "untrained", bandwidth, seed)
        if codebooks is not None:
            codec._set_codebooks(codebooks)
        return codec

    def _set_codebooks(self, codebooks: torch.Tensor) -> None:
        for level, embed in enumerate(codebooks):
            book = self.model.quantizer.vq.layers[level]._codebook
            book.embed.copy_(embed)
            book.embed_avg.copy_(embed)
            book.cluster_size.fill_(1.0)
            book.inited.fill_(1.0)

    def codebooks(self) -> torch.Tensor:
        """The codebooks in use: (levels, 1024, 128)."""
        layers = self.model.quantizer.vq.layers[:self.levels]
        return torch.stack([layer._codebook.embed.detach().cpu() for layer in layers])

    @torch.inference_mode()
    def fit(self, audio: torch.Tensor, iters: int = 20) -> None:
        """Fit the codebooks to audio (B, samples) by residual k-means on the encoder's latents: level 0 clusters
        the latents, level 1 what level 0 leaves over, and so on.

        Each cluster gets at least 4 latents on average: with fewer latents than 1024, a cluster per latent would
        leave a residual of exactly zero and every later level would learn nothing. So small data sets use fewer
        distinct codes (the unused rows of the codebook repeat used ones and are never chosen).
        """
        latents = torch.cat([self.model.encoder(chunk[:, None].to(self.device)).cpu()
                             for chunk in audio.split(16)])          # (B, 128, frames)
        residual = latents.transpose(1, 2).reshape(-1, latents.shape[1]).float()
        generator = torch.Generator().manual_seed(self.seed or 0)
        k = min(CODEBOOK_SIZE, max(1, len(residual) // 4))
        books = []
        for _ in range(self.levels):
            centroids = _kmeans(residual, k, iters, generator)
            residual = residual - centroids[_nearest(residual, centroids)]
            # argmin picks the first of equal distances, so the repeated rows after k are never chosen
            books.append(centroids[torch.arange(CODEBOOK_SIZE) % k])
        self._set_codebooks(torch.stack(books).to(self.device))

    @classmethod
    def load(cls, path: str | Path, bandwidth: float = 1.5) -> Codec:
        """A codec trained by train_codec.py, from its codec file (OUT_DIR/codec.pt), at `bandwidth` kbps. A file
        that is not a codec file, or is damaged, is a DataError of one line naming it."""
        bandwidth = cls.check_bandwidth(bandwidth)
        try:
            saved = load_checkpoint(path)
        except CheckpointError as e:
            raise DataError(f"codec file {e}") from None
        if saved.get("kind") != "codecgpt-codec" or "config" not in saved or "model" not in saved:
            raise DataError(f"{path}: not a codec file of train_codec.py (it has no codec config and weights; "
                            "a language-model checkpoint is not a codec)")
        return cls.trained(saved["config"], saved["model"], bandwidth, source=str(path))

    @classmethod
    def trained(cls, config: dict, weights: dict, bandwidth: float = 1.5, source: str = "codec") -> Codec:
        """A codec of codec.py (trained by train_codec.py) from its config and state dict."""
        from codec import from_inference_state
        try:
            model = from_inference_state(config, weights)
        except (TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{source}: its weights do not fit its codec config ({str(e).splitlines()[0]})") from None
        return cls(model, "trained", cls.check_bandwidth(bandwidth))

    def identity(self) -> dict:
        """What the codes depend on: goes into cache keys and checkpoints (tensors and plain values only). A trained
        codec carries its config and weights, so a language-model checkpoint needs nothing else to decode."""
        ident = {"kind": self.kind, "bandwidth": self.bandwidth, "levels": self.levels, "sample_rate": SAMPLE_RATE}
        if self.kind == "trained":
            from codec import inference_state
            weights = inference_state(self.model)
            ident.update(config=asdict(self.model.cfg), weights=weights, weights_sha=digest(weights)[:16])
        if self.kind == "untrained":
            books = self.codebooks()
            ident.update(seed=self.seed, codebooks=books,
                         codebooks_sha=hashlib.sha256(books.numpy().tobytes()).hexdigest()[:16])
        return ident

    @classmethod
    def from_identity(cls, ident: dict, weights: str | Path | None = None) -> Codec:
        """Rebuild the codec a checkpoint was trained with."""
        if ident["kind"] == "pretrained":
            return cls.pretrained(ident["bandwidth"], weights)
        if ident["kind"] == "trained":
            return cls.trained(ident["config"], ident["weights"], ident["bandwidth"])
        return cls.untrained(ident["bandwidth"], ident["seed"], ident["codebooks"])

    def to(self, device) -> Codec:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (B, samples) float at 24 kHz -> codes (B, levels, samples // 320) long, in full float32 on a GPU
        too (exact_float32)."""
        with exact_float32():
            if self.kind == "trained":
                return self.model.encode(audio.to(self.device))
            codes, _scale = self.model.encode(audio[:, None].to(self.device))[0]
        return codes

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, levels, frames) -> audio (B, frames * 320) float at 24 kHz."""
        if self.kind == "trained":
            return self.model.decode(codes.to(self.device))
        return self.model.decode([(codes.to(self.device), None)])[:, 0]


def codec_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint", weights: str | None = None) -> Codec:
    """The Codec a checkpoint of train.py was trained with (the pretrained one needs its weights: downloaded, or
    `weights`)."""
    try:
        return Codec.from_identity(ckpt["codec"], weights)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path}: its codec cannot be rebuilt ({type(e).__name__}: {e})") from None


@contextmanager
def exact_float32():
    """TF32 off for CUDA matmuls and cuDNN inside the block. EnCodec picks each code as the nearest codebook row by
    |x|^2 - 2 x.e + |e|^2; for the untrained codec the latents lie far from the origin and close to their rows, so
    that subtraction cancels most digits, and TF32 (on for train.py's model) would pick other codes than a CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# ----------------------------------------------------------------------------------------------------
# Encoding with an on-disk token cache

@dataclass
class EncodedFiles:
    codes: np.ndarray                 # (N, levels, frames) uint16, one row per usable file
    files: list[Path]                 # the N files, in row order
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason) for files that were unusable


def cache_path(cache_dir: str | Path, name: str, files: list[Path], codec: Codec, num_frames: int) -> Path:
    """One cache file per (split name, folder, codec, length): changing any of them uses another file."""
    ident = {k: v for k, v in codec.identity().items() if k not in ("codebooks", "weights")}
    root = os.path.commonpath({os.path.dirname(os.path.abspath(f)) for f in files}) if files else ""
    key = json.dumps({"root": root, "codec": ident, "frames": num_frames}, sort_keys=True)
    return Path(cache_dir) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"


def _file_key(path: Path) -> tuple[str, int, int]:
    """(absolute path, size, mtime): a file whose key changed is encoded again."""
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def encode_files(files: list[Path], codec: Codec, num_frames: int, cache: Path | None = None,
                 batch_size: int | None = None, save_every: float = 60.0, desc: str = "encoding") -> EncodedFiles:
    """Encode the first num_frames frames of each file, reusing and updating the cache file.

    batch_size None: 64 notes per batch on a GPU; 4 on a CPU, where bigger batches are slower per note (the
    encoder's activations outgrow the CPU caches; bench.py measures encoding).

    A file is encoded again when its size or mtime changed. Progress is saved every `save_every` seconds,
    so an interrupted run keeps what it did and the next run encodes only what is missing.
    """
    rows: dict[tuple, np.ndarray | str] = {}   # file key -> codes (levels, frames) or the reason it was skipped
    if cache is not None and cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                manifest = json.loads(bytes(z["manifest"]).decode())
                codes = z["codes"]
            if manifest.get("frames") == num_frames and manifest.get("levels") == codec.levels:
                for entry in manifest["entries"]:
                    key = (entry["path"], entry["size"], entry["mtime_ns"])
                    rows[key] = entry["error"] if entry["row"] is None else codes[entry["row"]]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
            print(f"token cache {cache} is unreadable; encoding again", file=sys.stderr)
            rows = {}

    keys, skipped_now = [], []
    for f in files:
        try:
            keys.append(_file_key(f))
        except OSError as e:  # vanished, or a broken link
            keys.append(None)
            skipped_now.append((f, f"cannot stat ({e.strerror})"))
    todo = [(f, k) for f, k in zip(files, keys) if k is not None and k not in rows]

    def save() -> None:
        if cache is None:
            return
        entries, arrays = [], []
        for k in keys:
            if k is None or k not in rows:
                continue
            value = rows[k]
            entry = {"path": k[0], "size": k[1], "mtime_ns": k[2], "row": None, "error": None}
            if isinstance(value, str):
                entry["error"] = value
            else:
                entry["row"] = len(arrays)
                arrays.append(value)
            entries.append(entry)
        manifest = {"version": 1, "frames": num_frames, "levels": codec.levels,
                    "codec": {k: v for k, v in codec.identity().items() if k not in ("codebooks", "weights")},
                    "entries": entries}
        codes = np.stack(arrays) if arrays else np.zeros((0, codec.levels, num_frames), np.uint16)
        cache.parent.mkdir(parents=True, exist_ok=True)
        manifest_bytes = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
        atomic_write(cache, lambda f: np.savez(f, codes=codes.astype(np.uint16), manifest=manifest_bytes))

    if batch_size is None:
        batch_size = 64 if codec.device.type == "cuda" else 4
    if todo:
        last_save = time.monotonic()
        with tqdm(total=len(todo), desc=desc, unit="file", disable=None) as bar:
            for start in range(0, len(todo), batch_size):
                batch, batch_keys = [], []
                for f, k in todo[start:start + batch_size]:
                    try:
                        batch.append(read_audio(f, num_frames * HOP))
                        batch_keys.append(k)
                    except DataError as e:
                        rows[k] = str(e)
                if batch:
                    codes = codec.encode(torch.from_numpy(np.stack(batch))).cpu().numpy().astype(np.uint16)
                    for k, c in zip(batch_keys, codes):
                        rows[k] = c
                bar.update(len(todo[start:start + batch_size]))
                if time.monotonic() - last_save > save_every:
                    save()
                    last_save = time.monotonic()
        save()

    used, codes, skipped = [], [], list(skipped_now)
    for f, k in zip(files, keys):
        if k is None:
            continue
        value = rows[k]
        if isinstance(value, str):
            skipped.append((f, value))
        else:
            used.append(f)
            codes.append(value)
    codes = np.stack(codes) if codes else np.zeros((0, codec.levels, num_frames), np.uint16)
    return EncodedFiles(codes, used, skipped)



# ----------------------------------------------------------------------------------------------------
# NSynth labels

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


class TokenDataset:
    """The token sequences of encoded notes (tokens: one row per note, BOS first), with the NSynth labels of each
    note (-1 where unknown), which are also in the tokens when the tokenizer has condition tokens."""

    def __init__(self, encoded: EncodedFiles, tokenizer: CodecTokenizer):
        self.files = encoded.files
        examples = {}
        for folder in sorted({f.parent for f in self.files}):
            examples.update(load_examples_json(folder) or {})
        labels = [nsynth_labels(f, examples) for f in self.files]
        self.pitch = torch.tensor([l["pitch"] for l in labels], dtype=torch.long)
        self.velocity = torch.tensor([l["velocity"] for l in labels], dtype=torch.long)
        self.source = torch.tensor([l["source"] for l in labels], dtype=torch.long)
        self.tokens = tokenizer.encode(torch.from_numpy(encoded.codes.astype(np.int64)),
                                       self.pitch, self.velocity, self.source)

    def __len__(self) -> int:
        return len(self.tokens)


def load_codec_for_training(kind: str, bandwidth: float, weights: str | None, fit_files: list[Path],
                            num_frames: int, cache_dir: str | Path, seed: int = 0, device="cpu") -> Codec:
    """The codec to train with. An untrained codec is fitted on up to 64 training files and saved in cache_dir,
    so later runs on the same files reuse it (and with it their token caches)."""
    if kind == "pretrained":
        return Codec.pretrained(bandwidth, weights).to(device)
    if weights is not None:
        raise DataError("--codec-weights only applies to --codec pretrained")
    if kind != "untrained":  # a codec file of train_codec.py
        return Codec.load(kind, bandwidth).to(device)
    def stat_or_error(f: Path) -> list[str]:
        try:
            return [str(k) for k in _file_key(f)]
        except OSError as e:  # a broken link or a vanished file
            return [str(f), str(e.strerror)]

    # Keyed by the first 64 files. The fit below looks further when some of them are unreadable; a change among
    # those later files then keeps the old codec, which is harmless: token caches are keyed by the codebooks.
    key = json.dumps([stat_or_error(f) for f in fit_files[:64]] + [bandwidth, seed, num_frames])
    path = Path(cache_dir) / f"codec-untrained-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return Codec.untrained(bandwidth, seed, saved["codebooks"]).to(device)
        except Exception as e:
            print(f"ignoring unreadable {path} ({e}); fitting the codec again", file=sys.stderr)
    audio, first_problem = [], None
    for f in fit_files:
        if len(audio) == 64:
            break
        try:
            audio.append(read_audio(f, num_frames * HOP))
        except DataError as e:  # counted and reported when the split is encoded
            first_problem = first_problem or f"{f}: {e}"
    if not audio:
        raise DataError(f"no readable audio among the {len(fit_files)} training files to fit the untrained codec on "
                        f"(the first: {first_problem})")
    codec = Codec.untrained(bandwidth, seed).to(device)
    print(f"fitting the untrained codec's {codec.levels} codebooks on {len(audio)} notes")
    codec.fit(torch.from_numpy(np.stack(audio)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fitted = {"codebooks": codec.codebooks(), "bandwidth": bandwidth, "seed": seed}
    atomic_write(path, lambda f: torch.save(fitted, f))
    return codec
