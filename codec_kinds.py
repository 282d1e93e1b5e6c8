"""
The codec behind --codec: audio (B, samples) at 24 kHz <-> codes (B, levels, frames) at 75 frames a second, 1024 codes
per codebook and 2 to 32 codebooks (levels) for 1.5 to 24 kbps. Three kinds, one interface (Codec):

- pretrained: Meta's EnCodec 24 kHz with its released weights (downloaded once, or --codec-weights PATH);
- untrained: the same network with random weights, its codebooks fitted to the data by residual k-means, so that the
  whole pipeline runs offline (its decoder was never trained: every note comes out as a tone);
- trained: a codec of codec.py trained by train_codec.py, read from its codec file (Codec.load).

load_codec is the one way in, for --codec's names and paths and for a checkpoint's codec entry (Codec.identity: what
the codes depend on, so that a checkpoint needs nothing else to decode). data.py turns files into codes with it.
"""
from __future__ import annotations

import hashlib
import sys
import urllib.error
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from checkpoint import CheckpointError, digest, load_checkpoint
from codec import BANDWIDTH_LEVELS, CODEBOOK_SIZE, SAMPLE_RATE, from_inference_state, inference_state, kmeans, nearest
from files import DataError, atomic_write

CODEC_FILE_KIND = "codecgpt-codec"   # what a codec file of train_codec.py says it is


def load_codec(codec: str | dict, bandwidth: float = 1.5, weights: str | Path | None = None, *,
               fit_on: Callable[[], Tensor] | None = None, cache_dir: str | Path | None = None, seed: int = 0,
               device="cpu") -> Codec:
    """--codec pretrained | untrained | PATH at `bandwidth` kbps, or a checkpoint's codec entry (its bandwidth, seed,
    codebooks or weights win). weights: the pretrained weights from a local file (--codec-weights). An untrained codec
    is fitted to the notes fit_on() returns (B, samples), and kept in cache_dir when given."""
    if isinstance(codec, dict):
        kind, bandwidth = codec["kind"], codec["bandwidth"]
        if kind == "trained":
            return Codec.trained(codec["config"], codec["weights"], bandwidth).to(device)
        if kind == "untrained":
            return Codec.untrained(bandwidth, codec["seed"], codec["codebooks"]).to(device)
        return Codec.pretrained(bandwidth, weights).to(device)
    if codec == "pretrained":
        return Codec.pretrained(bandwidth, weights).to(device)
    if weights is not None:
        raise DataError("--codec-weights only applies to --codec pretrained")
    if codec == "untrained":
        return fitted_untrained(bandwidth, seed, fit_on(), cache_dir, device)
    return Codec.load(codec, bandwidth).to(device)


def codec_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint", weights: str | None = None) -> Codec:
    """load_codec for the codec a checkpoint of train.py was trained with, its problems named after the file."""
    try:
        return load_codec(ckpt["codec"], weights=weights)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path}: its codec cannot be rebuilt ({type(e).__name__}: {e})") from None


def fitted_untrained(bandwidth: float, seed: int, audio: Tensor, cache_dir: str | Path | None, device) -> Codec:
    """An untrained codec whose codebooks are fitted to audio (B, samples), saved in cache_dir under a name made of
    the audio: a later run on the same notes reads them back, and with them finds its token caches."""
    key = hashlib.sha256(audio.numpy().tobytes() + repr((bandwidth, seed)).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"codec-untrained-{key}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return Codec.untrained(bandwidth, seed, saved["codebooks"]).to(device)
        except Exception as e:
            print(f"ignoring unreadable {path} ({e}); fitting the codec again", file=sys.stderr)
    codec = Codec.untrained(bandwidth, seed).to(device)
    print(f"fitting the untrained codec's {codec.levels} codebooks on {len(audio)} notes")
    codec.fit(audio)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fitted = {"codebooks": codec.codebooks(), "bandwidth": bandwidth, "seed": seed}
        atomic_write(path, lambda f: torch.save(fitted, f))
    return codec


def checked_bandwidth(bandwidth: float) -> float:
    if bandwidth not in BANDWIDTH_LEVELS:
        raise DataError(f"--bandwidth must be one of {sorted(BANDWIDTH_LEVELS)} kbps, got {bandwidth}")
    return float(bandwidth)


class Codec:
    """A codec at a fixed bandwidth: audio (B, samples) <-> codes (B, levels, frames). kind: 'pretrained' and
    'untrained' wrap encodec's EncodecModel, 'trained' codec.py's CodecModel; the three are built by the class
    methods of those names (Codec.load reads a codec file)."""

    def __init__(self, model, kind: str, bandwidth: float, seed: int | None = None):
        self.model, self.kind, self.bandwidth, self.seed = model, kind, bandwidth, seed
        self.levels = BANDWIDTH_LEVELS[bandwidth]
        model.set_target_bandwidth(bandwidth)
        model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> Codec:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def encode(self, audio: Tensor) -> Tensor:
        """audio (B, samples) float at 24 kHz -> codes (B, levels, samples // 320) long, in full float32 on a GPU
        too (exact_float32)."""
        with exact_float32():
            if self.kind == "trained":
                return self.model.encode(audio.to(self.device))
            codes, _scale = self.model.encode(audio[:, None].to(self.device))[0]
        return codes

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, levels, frames) -> audio (B, frames * 320) float at 24 kHz."""
        if self.kind == "trained":
            return self.model.decode(codes.to(self.device))
        return self.model.decode([(codes.to(self.device), None)])[:, 0]

    def identity(self) -> dict:
        """What the codes depend on, for cache keys and checkpoints (tensors and plain values only); load_codec
        rebuilds the codec from it."""
        ident = {"kind": self.kind, "bandwidth": self.bandwidth, "levels": self.levels, "sample_rate": SAMPLE_RATE}
        if self.kind == "trained":
            weights = inference_state(self.model)
            ident.update(config=asdict(self.model.cfg), weights=weights, weights_sha=digest(weights)[:16])
        if self.kind == "untrained":
            books = self.codebooks()
            ident.update(seed=self.seed, codebooks=books,
                         codebooks_sha=hashlib.sha256(books.numpy().tobytes()).hexdigest()[:16])
        return ident

    # ------------------------------------------------------------------------------------------------
    # The three kinds

    @classmethod
    def pretrained(cls, bandwidth: float = 1.5, weights: str | Path | None = None) -> Codec:
        """The released EnCodec 24 kHz weights: downloaded (and cached by torch.hub) or read from `weights`."""
        from encodec import EncodecModel  # imported here: encodec pulls in torchaudio
        bandwidth = checked_bandwidth(bandwidth)
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
                    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
                except Exception as e:  # missing, truncated, or not EnCodec 24 kHz weights
                    raise DataError(f"--codec-weights {weights}: not usable EnCodec 24 kHz weights ({e})") from None
        return cls(model, "pretrained", bandwidth)

    @classmethod
    def untrained(cls, bandwidth: float = 1.5, seed: int = 0, codebooks: Tensor | None = None) -> Codec:
        """EnCodec with random weights from `seed`, and codebooks (levels, 1024, 128) fitted before, or None to call
        fit() next: until then every code is 0 (its codebooks start at zero and fill only in training mode)."""
        from encodec import EncodecModel
        bandwidth = checked_bandwidth(bandwidth)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.manual_seed(seed)
            model = EncodecModel.encodec_model_24khz(pretrained=False)
        codec = cls(model, "untrained", bandwidth, seed)
        if codebooks is not None:
            codec.set_codebooks(codebooks)
        return codec

    @classmethod
    def load(cls, path: str | Path, bandwidth: float = 1.5) -> Codec:
        """A codec trained by train_codec.py, from its codec file (OUT_DIR/codec.pt), at `bandwidth` kbps. A file
        that is not a codec file, or is damaged, is a DataError of one line naming it."""
        bandwidth = checked_bandwidth(bandwidth)
        try:
            saved = load_checkpoint(path)
        except CheckpointError as e:
            raise DataError(f"codec file {e}") from None
        if saved.get("kind") != CODEC_FILE_KIND or "config" not in saved or "model" not in saved:
            raise DataError(f"{path}: not a codec file of train_codec.py (it has no codec config and weights; "
                            "a language-model checkpoint is not a codec)")
        return cls.trained(saved["config"], saved["model"], bandwidth, source=str(path))

    @classmethod
    def trained(cls, config: dict, weights: dict, bandwidth: float = 1.5, source: str = "codec") -> Codec:
        """A codec of codec.py from its config and weights (codec.inference_state)."""
        try:
            model = from_inference_state(config, weights)
        except (TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{source}: its weights do not fit its codec config ({str(e).splitlines()[0]})") from None
        return cls(model, "trained", checked_bandwidth(bandwidth))

    # ------------------------------------------------------------------------------------------------
    # The untrained codec's codebooks

    @torch.inference_mode()
    def fit(self, audio: Tensor, iters: int = 20) -> None:
        """Fit the codebooks to audio (B, samples) by residual k-means on the encoder's latents: level 0 clusters
        the latents, level 1 what level 0 leaves over, and so on.

        Each cluster gets at least 4 latents on average: with fewer latents than 1024, a cluster per latent would
        leave a residual of exactly zero and every later level would learn nothing. So small data sets use fewer
        distinct codes (the unused rows of the codebook repeat used ones and are never chosen)."""
        latents = torch.cat([self.model.encoder(chunk[:, None].to(self.device)).cpu()
                             for chunk in audio.split(16)])          # (B, 128, frames)
        residual = latents.transpose(1, 2).reshape(-1, latents.shape[1]).float()
        generator = torch.Generator().manual_seed(self.seed or 0)
        k = min(CODEBOOK_SIZE, max(1, len(residual) // 4))
        books = []
        for _ in range(self.levels):
            centroids = kmeans(residual, k, iters, generator)
            residual = residual - centroids[nearest(residual, centroids)]
            # argmin picks the first of equal distances, so the repeated rows after k are never chosen
            books.append(centroids[torch.arange(CODEBOOK_SIZE) % k])
        self.set_codebooks(torch.stack(books).to(self.device))

    def set_codebooks(self, codebooks: Tensor) -> None:
        for level, embed in enumerate(codebooks):
            book = self.model.quantizer.vq.layers[level]._codebook
            book.embed.copy_(embed)
            book.embed_avg.copy_(embed)
            book.cluster_size.fill_(1.0)
            book.inited.fill_(1.0)

    def codebooks(self) -> Tensor:
        """The codebooks in use: (levels, 1024, 128)."""
        layers = self.model.quantizer.vq.layers[:self.levels]
        return torch.stack([layer._codebook.embed.detach().cpu() for layer in layers])


@contextmanager
def exact_float32():
    """TF32 off for CUDA matmuls and cuDNN inside the block. EnCodec picks each code as the nearest codebook row by
    |x|^2 - 2 x.e + |e|^2; the untrained codec's latents lie far from the origin and close to their rows, so that
    subtraction cancels most digits, and TF32 (on for train.py's model) would pick other codes than a CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
