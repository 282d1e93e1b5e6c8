"""
A codec trained here: audio <-> EnCodec-shaped codes (up to 32 residual codebooks of 1024 codes, 75 frames/s).

    audio --encoder--> latent (B, 128, frames) --RVQ--> codes (B, levels, frames) --decoder--> audio

Two sizes, one interface (CodecModel.encode / decode / forward, codec_loss, evaluate):

- 'small' (the default, learns on a 2-core CPU in minutes): a spectral encoder (log-magnitude STFT frames through
  ConvNeXt blocks) and a decoder that knows what a pitched note is (DDSP, Engel et al. 2020): per frame it predicts
  an f0 (a class over 20-cent bins), an amplitude and how it is shared among the harmonics of that f0, and the
  spectral envelope of a filtered noise, and a synthesizer turns those into samples. Plain waveform decoders
  (EnCodec's SEANet, a Vocos iSTFT head) learned no pitch in 30 CPU minutes (issue 16); this one is told what a
  note is made of.
- 'encodec': the published 24 kHz architecture (encodec.EncodecModel.encodec_model_24khz(pretrained=False),
  SEANet encoder and decoder), for GPUs. Its EncodecModel is `model.net`, so the released weights load into it
  with model.net.load_state_dict(...).

Both use the `encodec` package's residual vector quantizer (EMA codebooks), driven by our own loop (quantize):
- the package's RVQ lets only the first codebook's commitment loss reach the encoder (encodec issue #25: the
  residual handed to level 2 is built from a straight-through estimate whose gradient cancels). Here every level's
  residual is built from detached codes, so each level's commitment loss reaches the encoder (as audiocraft does);
- its dead-code threshold (2 uses per step, EMA) suits batches of many thousand frames; a CPU batch holds about
  1,000 frames for 1024 codes, so the threshold is a fraction of the average use per code instead
  (CodecConfig.dead_code_fraction), and codebooks start from residual k-means on real latents (init_codebooks);
- the bandwidth (number of levels) is drawn per batch by the caller, as EnCodec does, so one codec serves them all.

The training losses are one function, codec_loss, used by training and evaluation alike. The package has no loss
balancer (0.1.1): the losses are added with the fixed weights of CodecConfig.

The decoder uses only the codes at inference. During training the note's f0 (from its file name, or Praat's
estimate) is a teacher: it drives the synthesizer, and the f0 head learns it by cross-entropy from the codes.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The EnCodec 24 kHz constants (data.py has the same; codec.py does not import data.py, which imports it)
SAMPLE_RATE = 24_000
FRAME_RATE = 75
HOP = SAMPLE_RATE // FRAME_RATE                                   # 320 samples per frame
BANDWIDTH_LEVELS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}   # kbps -> number of codebooks
CODEBOOK_SIZE = 1024
MAX_LEVELS = 32


@dataclass
class CodecConfig:
    size: str = "small"               # 'small' (spectral encoder + harmonic-plus-noise decoder) or 'encodec'
    latent_dim: int = 128             # the quantizer's dimension (EnCodec's is 128)
    # small: the encoder and decoder
    width: int = 256                  # channels of the ConvNeXt blocks
    encoder_blocks: int = 2
    decoder_blocks: int = 4
    n_fft: int = 2048                 # the encoder's STFT (hop = HOP): 11.7 Hz bins resolve an 82 Hz note's partials
    loudness_gain: float = 32.0       # the encoder's three loudness channels x 32/5 (SpectralEncoder)
    harmonics: int = 64               # partials of the additive synthesizer (those above 12 kHz are silent)
    noise_bands: int = 65             # the filtered noise's spectral envelope, linear bands 0-12 kHz
    f0_min_midi: float = 23.0         # the f0 classes: 20-cent bins from MIDI 23 (30.9 Hz) to 108 (4186 Hz),
    f0_max_midi: float = 108.0        #   the range pitch.py's tracker searches
    f0_cents_per_bin: float = 20.0
    # the quantizer
    ema_decay: float = 0.95           # codebook EMA: about 20 steps of ~500 frames; the latents move fast early on
    dead_code_fraction: float = 0.1   # a code is dead below this fraction of the average use per code (EMA)
    # loss weights (fixed: encodec 0.1.1 has no balancer)
    w_l1: float = 0.0                 # waveform L1: the additive synthesizer's phases are its own, so L1 only
                                      #   pulls the output towards silence; kept at 0 for 'small' (measured)
    w_stft: float = 1.0               # multi-resolution STFT (auraloss: spectral convergence + log magnitude)
    w_harmonic: float = 1.0           # log harmonic amplitudes vs the input's, at the teacher f0 ('small')
    w_f0: float = 1.0                 # f0 cross-entropy ('small')
    w_commit: float = 1.0             # commitment, summed over levels
    w_loudness: float = 1.0           # log RMS per 320-sample frame vs the input's: the level, whatever the partials
    w_adv: float = 3.0                # --adversarial: hinge generator loss and feature matching (EnCodec's 3, 3)
    w_feat: float = 3.0

    def __post_init__(self):
        if self.size not in ("small", "encodec"):
            raise ValueError(f"codec size must be 'small' or 'encodec', got {self.size!r}")

    @property
    def f0_bins(self) -> int:
        return int(round((self.f0_max_midi - self.f0_min_midi) * 100 / self.f0_cents_per_bin)) + 1


# ----------------------------------------------------------------------------------------------------
# Building blocks of the small codec

class ConvNeXtBlock(nn.Module):
    """ConvNeXt (Liu et al. 2022) over frames, as Vocos uses it: a depthwise conv mixes neighbouring frames, a
    two-layer MLP mixes channels, and the block adds a learned fraction (layer scale) of that to its input."""

    def __init__(self, dim: int, kernel: int = 7):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.scale = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: Tensor) -> Tensor:         # (B, dim, frames)
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.down(F.gelu(self.up(y))) * self.scale
        return x + y.transpose(1, 2)


def log_spectrogram(audio: Tensor, n_fft: int) -> Tensor:
    """(B, samples) -> log magnitudes (B, n_fft // 2 + 1, samples // HOP): one STFT frame per codec frame."""
    window = torch.hann_window(n_fft, device=audio.device)
    spec = torch.stft(audio, n_fft, HOP, window=window, center=True, return_complex=True)
    frames = audio.shape[-1] // HOP
    return torch.log(spec.abs()[..., :frames] + 1e-5)


class SpectralEncoder(nn.Module):
    """Log-magnitude STFT frames -> a linear map -> ConvNeXt blocks -> latent (B, latent_dim, frames).

    Each frame's log spectrum is normalised (its mean and spread over frequency removed) and those two numbers,
    with the frame's level (the log of its energy), are passed on as three channels of their own. Without the
    normalisation, the loudness of a frame (the same offset in all 1025 log bins) is by far the largest thing in
    the latent, and the codebooks cluster the frames by loudness instead of by pitch (measured: 12 codes in use at
    level 1 for 40 notes, f0 loss stuck). The mean of the log bins is not the level: most bins lie between the
    partials, so it follows the brightness; without the level channel the decoder could not tell a soft pluck from
    a hard one. The three are scaled by loudness_gain / 5 so that they weigh in the first layer against 1025
    spectral channels (docs/codec.md has what the scale did to the pluck's level)."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.n_fft, self.loudness_gain = cfg.n_fft, cfg.loudness_gain
        self.inp = nn.Conv1d(cfg.n_fft // 2 + 4, cfg.width, 1)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(cfg.width) for _ in range(cfg.encoder_blocks)])
        self.norm = nn.LayerNorm(cfg.width)
        self.out = nn.Conv1d(cfg.width, cfg.latent_dim, 1)

    def forward(self, audio: Tensor) -> Tensor:
        spec = log_spectrogram(audio, self.n_fft)
        mean, std = spec.mean(1, keepdim=True), spec.std(1, keepdim=True)
        level = torch.logsumexp(2 * spec, 1, keepdim=True) / 2      # log sqrt(energy): the frame's loudness
        loud = torch.cat([mean, std, level], 1) / 5 * self.loudness_gain  # /5: log magnitudes span about -11..3
        x = torch.cat([(spec - mean) / (std + 1e-5), loud], 1)
        x = self.blocks(self.inp(x))
        return self.out(self.norm(x.transpose(1, 2)).transpose(1, 2))


def exp_sigmoid(x: Tensor) -> Tensor:
    """DDSP's positive output: 2 sigmoid(x)^ln(10) + 1e-7, from 1e-7 to 2, smooth in log scale."""
    return 2.0 * torch.sigmoid(x) ** math.log(10.0) + 1e-7


def frames_to_samples(x: Tensor, samples: int) -> Tensor:
    """(B, C, frames) -> (B, C, samples), linear between frame centres."""
    return F.interpolate(x, size=samples, mode="linear", align_corners=False)


class HarmonicNoiseDecoder(nn.Module):
    """Latent (B, latent_dim, frames) -> per frame: f0 logits, an amplitude and its distribution over the partials,
    a noise envelope -> audio.

    A plucked string is a sum of partials at whole multiples of its f0, plus the noise of the pluck. The network
    only predicts those few numbers per frame; `synthesize` makes the samples, so pitch is exact by construction
    once the f0 is right, and the losses only have to teach it the spectrum."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Conv1d(cfg.latent_dim, cfg.width, 1)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(cfg.width) for _ in range(cfg.decoder_blocks)])
        self.norm = nn.LayerNorm(cfg.width)
        self.f0_head = nn.Linear(cfg.width, cfg.f0_bins)
        self.amplitude_head = nn.Linear(cfg.width, 1)
        self.distribution_head = nn.Linear(cfg.width, cfg.harmonics)
        self.noise_head = nn.Linear(cfg.width, cfg.noise_bands)
        with torch.no_grad():
            # start quiet, partials rolling off as 1/k, noise far below them: the first steps then refine a
            # plausible note instead of climbing out of a loud random one
            k = torch.arange(1, cfg.harmonics + 1, dtype=torch.float)
            self.amplitude_head.bias.fill_(float(inverse_exp_sigmoid(torch.tensor(0.1))))
            self.distribution_head.bias.copy_(-torch.log(k))
            self.noise_head.bias.fill_(float(inverse_exp_sigmoid(torch.tensor(1e-4))))
        midi = cfg.f0_min_midi + torch.arange(cfg.f0_bins) * cfg.f0_cents_per_bin / 100
        self.register_buffer("bin_hz", 440.0 * 2 ** ((midi - 69) / 12), persistent=False)

    def controls(self, latent: Tensor) -> dict:
        h = self.norm(self.blocks(self.inp(latent)).transpose(1, 2))          # (B, frames, width)
        return {"f0_logits": self.f0_head(h),                                 # (B, frames, f0_bins)
                "amplitude": exp_sigmoid(self.amplitude_head(h)).transpose(1, 2),  # (B, 1, frames)
                "distribution": self.distribution_head(h).transpose(1, 2),  # (B, K, frames) logits
                "noise": exp_sigmoid(self.noise_head(h)).transpose(1, 2)}     # (B, bands, frames)

    def f0_from_logits(self, logits: Tensor) -> Tensor:
        """The f0 (Hz) per frame: the most likely bin, refined by the probability-weighted mean of it and its two
        neighbours on each side (in cents), so the answer is not rounded to 20 cents."""
        probs = logits.softmax(-1)
        best = probs.argmax(-1, keepdim=True)
        idx = (best + torch.arange(-2, 3, device=logits.device)).clamp(0, self.cfg.f0_bins - 1)
        w = probs.gather(-1, idx)
        bins = (w * idx).sum(-1) / w.sum(-1).clamp(min=1e-9)
        midi = self.cfg.f0_min_midi + bins * self.cfg.f0_cents_per_bin / 100
        return 440.0 * 2 ** ((midi - 69) / 12)

    def harmonic_amplitudes(self, f0: Tensor, amplitude: Tensor, distribution: Tensor) -> Tensor:
        """Each partial's amplitude (B, K, frames): the overall amplitude (B, 1, frames) shared out by the softmax of
        the distribution logits (B, K, frames) over the partials below Nyquist (those above would alias). As DDSP
        does: the level is one number per frame, apart from the spectral shape, so the loudness has an output of
        its own rather than being spread over 64 (a per-partial output ignored the level: docs/codec.md)."""
        k = torch.arange(1, distribution.shape[1] + 1, device=f0.device, dtype=f0.dtype)
        audible = k[None, :, None] * f0[:, None, :] < SAMPLE_RATE / 2
        return amplitude * distribution.masked_fill(~audible, -torch.inf).softmax(1)

    def synthesize(self, f0: Tensor, harmonics: Tensor, noise: Tensor, noise_seed: int | None = None) -> Tensor:
        """f0 (B, frames) Hz, harmonics (B, K, frames), noise (B, bands, frames) -> audio (B, frames * HOP). The
        harmonics are harmonic_amplitudes' (zero above Nyquist), or any the caller has made safe the same way."""
        B, K, frames = harmonics.shape
        samples = frames * HOP
        k = torch.arange(1, K + 1, device=f0.device, dtype=f0.dtype)
        f0_s = frames_to_samples(f0[:, None], samples)[:, 0]                  # (B, samples)
        amp_s = frames_to_samples(harmonics, samples)                         # (B, K, samples)
        # phase in cycles, kept in [0, 1): (k * (c mod 1)) mod 1 == (k c) mod 1 for whole k, so float32 stays exact
        cycles = torch.cumsum(f0_s / SAMPLE_RATE, dim=-1) % 1.0
        # each partial starts at Schroeder's phase (1970), pi k (k - 1) / K: partials all starting at phase 0 add up
        # to peaks about 15 dB above the RMS, so even a quiet note reached full scale; these keep the peaks low
        start = math.pi * k * (k - 1) / K
        partials = torch.sin(2 * math.pi * ((k[None, :, None] * cycles[:, None]) % 1.0) + start[None, :, None])
        harmonic = (amp_s * partials).sum(1)
        # filtered noise: white noise in the STFT domain shaped by the frame's band envelope (n_fft = 2 hops)
        n_fft = 2 * HOP
        bins = n_fft // 2 + 1
        env = F.interpolate(noise.transpose(1, 2), size=bins, mode="linear", align_corners=True).transpose(1, 2)
        gen = torch.Generator(device=f0.device).manual_seed(noise_seed) if noise_seed is not None else None
        phase = torch.rand(B, bins, frames + 1, device=f0.device, generator=gen) * 2 * math.pi
        env = F.pad(env, (0, 1))                                               # istft wants frames + 1 columns
        spec = torch.polar(env, phase)
        noisy = torch.istft(spec, n_fft, HOP, window=torch.hann_window(n_fft, device=f0.device), center=True,
                            length=samples)
        return harmonic + noisy


def inverse_exp_sigmoid(y: Tensor) -> Tensor:
    """x with exp_sigmoid(x) == y (for initial biases)."""
    s = ((y - 1e-7).clamp(min=1e-12) / 2) ** (1 / math.log(10.0))
    return torch.log(s / (1 - s))


# ----------------------------------------------------------------------------------------------------
# The codec

@dataclass
class CodecOutput:
    audio: Tensor                     # (B, samples) the reconstruction
    codes: Tensor                     # (B, levels, frames)
    commit: Tensor                    # (levels,) commitment loss of each level
    controls: dict = field(default_factory=dict)   # small: f0_logits, harmonics, noise


class CodecModel(nn.Module):
    def __init__(self, cfg: CodecConfig | None = None):
        super().__init__()
        from encodec.quantization import ResidualVectorQuantizer
        self.cfg = cfg = cfg or CodecConfig()
        with warnings.catch_warnings():           # encodec uses the deprecated torch.nn.utils.weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            if cfg.size == "encodec":
                from encodec import EncodecModel
                self.net = EncodecModel.encodec_model_24khz(pretrained=False)
                self.quantizer = self.net.quantizer   # the same module: pretrained weights load into self.net
            else:
                self.encoder = SpectralEncoder(cfg)
                self.decoder = HarmonicNoiseDecoder(cfg)
                # kmeans_init=False: init_codebooks fits them on many frames instead of the first batch's
                self.quantizer = ResidualVectorQuantizer(dimension=cfg.latent_dim, n_q=MAX_LEVELS, bins=CODEBOOK_SIZE,
                                                         decay=cfg.ema_decay, kmeans_init=False)
        self.levels = BANDWIDTH_LEVELS[1.5]

    def set_target_bandwidth(self, bandwidth: float) -> None:
        """Levels used by encode() from now on (1.5 kbps = 2 ... 24 kbps = 32)."""
        self.levels = BANDWIDTH_LEVELS[float(bandwidth)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- the three parts --------------------------------------------------------------------------------
    def latent(self, audio: Tensor) -> Tensor:
        """(B, samples) -> (B, latent_dim, samples // HOP)."""
        if self.cfg.size == "encodec":
            return self.net.encoder(audio[:, None])[..., :audio.shape[-1] // HOP]
        return self.encoder(audio)

    def quantize(self, latent: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
        """Residual VQ over the package's codebooks -> (quantized latent, codes (B, levels, frames), commitment
        per level). In training each level's codebook moves by EMA (update_codebook) and its commitment loss pulls
        the encoder towards it (every level's, not only the first's: encodec issue #25); the decoder gets the
        quantized latent through a straight-through estimator."""
        B, D, T = latent.shape
        residual, total, codes, commit = latent, torch.zeros_like(latent), [], []
        for layer in self.quantizer.vq.layers[:levels]:
            book = layer._codebook
            flat = residual.detach().transpose(1, 2).reshape(-1, D)
            idx = nearest(flat, book.embed)
            q = book.embed[idx].view(B, T, D).transpose(1, 2)   # before the update: what encode() would give
            if self.training:
                update_codebook(book, flat, idx, self.cfg.ema_decay, self.cfg.dead_code_fraction)
            commit.append(F.mse_loss(residual, q))
            residual = residual - q
            total = total + q
            codes.append(idx.view(B, T))
        quantized = latent + (total - latent).detach()  # straight-through: gradients pass to the encoder
        return quantized, torch.stack(codes, 1), torch.stack(commit)

    def dequantize(self, codes: Tensor) -> Tensor:
        """codes (B, levels, frames) -> the quantized latent (B, latent_dim, frames)."""
        return self.quantizer.vq.decode(codes.transpose(0, 1))

    def synth(self, quantized: Tensor, f0_hz: Tensor | None = None, noise_seed: int | None = None
              ) -> tuple[Tensor, dict]:
        """Quantized latent -> (audio (B, samples), controls). f0_hz (B,) is the training teacher (NaN where
        unknown); without it the synthesizer plays the f0 the decoder reads from the codes."""
        if self.cfg.size == "encodec":
            return self.net.decoder(quantized)[:, 0], {}
        if noise_seed is None and not self.training:
            noise_seed = 0    # evaluation is deterministic, and leaves the global random stream alone (exact resume)
        c = self.decoder.controls(quantized)
        f0 = self.decoder.f0_from_logits(c["f0_logits"].detach())            # (B, frames)
        if f0_hz is not None:
            known = torch.isfinite(f0_hz)
            f0 = torch.where(known[:, None], f0_hz.nan_to_num(1.0)[:, None].to(f0), f0)
        c["harmonics"] = self.decoder.harmonic_amplitudes(f0, c.pop("amplitude"), c.pop("distribution"))
        audio = self.decoder.synthesize(f0, c["harmonics"], c["noise"], noise_seed)
        return audio, c

    # -- what other code calls ----------------------------------------------------------------------------
    def forward(self, audio: Tensor, levels: int, f0_hz: Tensor | None = None) -> CodecOutput:
        quantized, codes, commit = self.quantize(self.latent(audio), levels)
        out, controls = self.synth(quantized, f0_hz)
        return CodecOutput(out, codes, commit, controls)

    @torch.no_grad()
    def encode(self, audio: Tensor) -> Tensor:
        """audio (B, samples) at 24 kHz -> codes (B, levels, samples // 320) at the set bandwidth."""
        latent = self.latent(audio)
        return self.quantizer.vq.encode(latent, n_q=self.levels).transpose(0, 1)

    @torch.no_grad()
    def decode(self, codes: Tensor, noise_seed: int | None = 0) -> Tensor:
        """codes (B, levels, frames) -> audio (B, frames * 320). The noise part is drawn from noise_seed, so the
        same codes always give the same samples."""
        return self.synth(self.dequantize(codes), noise_seed=noise_seed)[0]

    @torch.no_grad()
    def init_codebooks(self, audio: Tensor, iters: int = 10, seed: int = 0) -> None:
        """Every level's codebook from residual k-means on the latents of audio (B, samples): level 1 clusters the
        latents, level 2 what level 1 leaves over, and so on. Many more frames than 1024 codes make for clusters
        that hold more than one frame each (the package would fit them on the first batch alone)."""
        latent = torch.cat([self.latent(chunk) for chunk in audio.split(16)])
        residual = latent.transpose(1, 2).reshape(-1, latent.shape[1])
        gen = torch.Generator().manual_seed(seed)
        for layer in self.quantizer.vq.layers:
            book = layer._codebook
            centroids = kmeans(residual, CODEBOOK_SIZE, iters, gen)
            residual = residual - centroids[nearest(residual, centroids)]
            book.embed.copy_(centroids)
            book.embed_avg.copy_(centroids)
            book.cluster_size.fill_(1.0)    # counts and sums consistent with embed: embed_avg / cluster_size
            book.inited.fill_(1.0)


@torch.no_grad()
def update_codebook(book, x: Tensor, idx: Tensor, decay: float, dead_fraction: float) -> None:
    """One EMA step of an encodec EuclideanCodebook (its buffers: embed, embed_avg, cluster_size) on the frames x
    (N, D) assigned to codes idx, then dead codes restarted.

    Written out here rather than calling the package's forward: in encodec 0.1.1 a dead code is replaced in `embed`
    only, and the EMA step that follows overwrites it with embed_avg / cluster_size, so the replacement is lost and
    the codebook collapses to a few codes (measured: 2 codes in use at level 1 after 100 steps). Here a dead code
    gets a random frame of the batch in all three buffers, with the average use as its count, so it has time to be
    chosen before it could be judged dead again. A code is dead when its EMA use falls below dead_fraction of the
    average use per code (a fixed threshold of 2, the package's, would expire nearly every code at CPU batches of
    about 1,000 frames for 1024 codes)."""
    K = book.embed.shape[0]
    counts = torch.bincount(idx, minlength=K).to(x.dtype)
    sums = torch.zeros_like(book.embed).index_add_(0, idx, x)
    book.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
    book.embed_avg.mul_(decay).add_(sums, alpha=1 - decay)
    n = book.cluster_size.sum()
    smoothed = (book.cluster_size + 1e-5) / (n + K * 1e-5) * n       # Laplace smoothing, as the package does
    book.embed.copy_(book.embed_avg / smoothed[:, None])
    use = len(x) / K
    dead = book.cluster_size < dead_fraction * use
    if dead.any():
        new = x[torch.randint(len(x), (int(dead.sum()),), device=x.device)]
        book.embed[dead] = new
        book.embed_avg[dead] = new * use
        book.cluster_size[dead] = use


def nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid for each row of x (N, D)."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)).argmin(1)


def kmeans(x: Tensor, k: int, iters: int, gen: torch.Generator) -> Tensor:
    """Plain k-means on x (N, D) -> (k, D); an empty cluster restarts at a random point."""
    centroids = x[torch.randint(len(x), (k,), generator=gen)]
    for _ in range(iters):
        assign = nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = torch.where((counts == 0)[:, None], x[torch.randint(len(x), (k,), generator=gen)],
                                sums / counts.clamp(min=1)[:, None])
    return centroids


# ----------------------------------------------------------------------------------------------------
# The losses: one function for training and evaluation

_STFT_LOSSES: dict = {}


def stft_loss(device) -> nn.Module:
    """auraloss's multi-resolution STFT loss (spectral convergence + log magnitude) at 4 windows, 256 to 2048
    samples: the 2048 window resolves the partials of the lowest notes, the short ones the pluck's onset."""
    import auraloss
    key = str(device)
    if key not in _STFT_LOSSES:
        sizes = [2048, 1024, 512, 256]
        _STFT_LOSSES[key] = auraloss.freq.MultiResolutionSTFTLoss(
            fft_sizes=sizes, hop_sizes=[s // 4 for s in sizes], win_lengths=sizes, eps=1e-7).to(device)
    return _STFT_LOSSES[key]


def harmonic_targets(audio: Tensor, f0_hz: Tensor, harmonics: int, n_fft: int = 2048) -> Tensor:
    """The input's amplitude at each partial k * f0 (B, K, frames), read off its STFT (the larger of the two bins
    around k f0, scaled so a sine of amplitude A reads A). What the harmonic head should put out."""
    window = torch.hann_window(n_fft, device=audio.device)
    mag = torch.stft(audio, n_fft, HOP, window=window, center=True, return_complex=True).abs()
    mag = mag[..., :audio.shape[-1] // HOP] * 2 / window.sum()               # (B, bins, frames)
    k = torch.arange(1, harmonics + 1, device=audio.device, dtype=audio.dtype)
    pos = (k[None] * f0_hz[:, None] * n_fft / SAMPLE_RATE).clamp(max=mag.shape[1] - 2)  # (B, K)
    lo = pos.floor().long()
    idx = torch.stack([lo, lo + 1], -1).view(audio.shape[0], -1)
    picked = mag.gather(1, idx[..., None].expand(-1, -1, mag.shape[-1]))
    return picked.view(audio.shape[0], harmonics, 2, -1).amax(2)


def f0_class(cfg: CodecConfig, f0_hz: Tensor) -> Tensor:
    """Hz -> the nearest 20-cent bin (long)."""
    midi = 69 + 12 * torch.log2(f0_hz / 440.0)
    return ((midi - cfg.f0_min_midi) * 100 / cfg.f0_cents_per_bin).round().long().clamp(0, cfg.f0_bins - 1)


def codec_loss(model: CodecModel, audio: Tensor, levels: int, f0_hz: Tensor | None = None
               ) -> tuple[Tensor, dict, CodecOutput]:
    """The loss of reconstructing audio (B, samples) through `levels` codebooks: (weighted total, each part as a
    float, the model's output). f0_hz (B,) is the teacher f0 (NaN where unknown), used by 'small' only."""
    raw = model.module if hasattr(model, "module") else model     # under DDP, the config lives on the module
    cfg = raw.cfg
    out = model(audio, levels, f0_hz if cfg.size == "small" else None)
    samples = out.audio.shape[-1]
    target = audio[..., :samples]
    parts = {"stft": stft_loss(audio.device)(out.audio[:, None], target[:, None]),
             "l1": F.l1_loss(out.audio, target),
             "commit": out.commit.sum()}
    total = cfg.w_stft * parts["stft"] + cfg.w_l1 * parts["l1"] + cfg.w_commit * parts["commit"]
    if cfg.w_loudness:
        frame_rms = lambda x: x.reshape(x.shape[0], -1, HOP).pow(2).mean(-1).add(1e-8).sqrt()  # noqa: E731
        parts["loudness"] = (torch.log(frame_rms(out.audio) + 1e-4) - torch.log(frame_rms(target) + 1e-4)).abs().mean()
        total = total + cfg.w_loudness * parts["loudness"]
    if cfg.size == "small" and f0_hz is not None and torch.isfinite(f0_hz).any():
        known = torch.isfinite(f0_hz)
        f0 = f0_hz[known].to(audio)
        logits = out.controls["f0_logits"][known]                           # (b, frames, bins)
        target_bin = f0_class(cfg, f0)[:, None].expand(-1, logits.shape[1])
        parts["f0"] = F.cross_entropy(logits.flatten(0, 1), target_bin.flatten())
        wanted = harmonic_targets(target[known], f0, cfg.harmonics, cfg.n_fft)
        got = out.controls["harmonics"][known]
        audible = (torch.arange(1, cfg.harmonics + 1, device=f0.device)[None] * f0[:, None] < SAMPLE_RATE / 2)
        # log amplitudes, floored at -80 dB: the quiet upper partials count, silence does not dominate
        diff = (torch.log(got + 1e-4) - torch.log(wanted + 1e-4)).abs() * audible[..., None]
        parts["harmonic"] = diff.sum() / (audible.sum() * diff.shape[-1]).clamp(min=1)
        total = total + cfg.w_f0 * parts["f0"] + cfg.w_harmonic * parts["harmonic"]
    return total, {k: float(v.detach()) for k, v in parts.items()}, out


# ----------------------------------------------------------------------------------------------------
# --adversarial: EnCodec's multi-scale STFT discriminator, hinge loss and feature matching

def make_discriminator() -> nn.Module:
    from encodec.msstftd import MultiScaleSTFTDiscriminator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return MultiScaleSTFTDiscriminator(filters=32)


def discriminator_loss(disc: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """EnCodec's hinge loss of the discriminator on real audio and detached reconstructions (B, samples)."""
    logits_real, _ = disc(real[:, None])
    logits_fake, _ = disc(fake.detach()[:, None])
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(logits_real, logits_fake)) / len(logits_real)


def generator_losses(disc: nn.Module, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """(hinge generator loss, feature matching loss) of the reconstructions, through the discriminator as it is
    after its own step: feature matching is the L1 between its feature maps of real and reconstructed audio,
    relative to the real maps' mean magnitude, averaged over all layers of all scales (as EnCodec)."""
    logits_fake, fmaps_fake = disc(fake[:, None])
    with torch.no_grad():
        _, fmaps_real = disc(real[:, None])
    g_loss = sum(F.relu(1 - f).mean() for f in logits_fake) / len(logits_fake)
    feat = sum(F.l1_loss(f, r) / (r.abs().mean() + 1e-8)
               for fs, rs in zip(fmaps_fake, fmaps_real) for f, r in zip(fs, rs))
    return g_loss, feat / sum(len(fs) for fs in fmaps_fake)


# ----------------------------------------------------------------------------------------------------
# Evaluation metrics

def si_snr(estimate: Tensor, reference: Tensor) -> Tensor:
    """Scale-invariant signal-to-noise ratio in dB, per item: how much of the estimate is the reference (after the
    best scaling) rather than anything else. Phase matters: a note at the right pitch with other phases scores low."""
    estimate = estimate - estimate.mean(-1, keepdim=True)
    reference = reference - reference.mean(-1, keepdim=True)
    scale = (estimate * reference).sum(-1, keepdim=True) / (reference.pow(2).sum(-1, keepdim=True) + 1e-8)
    signal = scale * reference
    return 10 * torch.log10(signal.pow(2).sum(-1) / ((estimate - signal).pow(2).sum(-1) + 1e-8) + 1e-8)


_MELS: dict = {}


def mel_distance(estimate: Tensor, reference: Tensor) -> Tensor:
    """Multi-scale mel distance, per item: mean L1 between log10 mel spectrograms (64 mels) at windows of 512, 1024
    and 2048 samples (torchaudio's transform), averaged over the scales. 0 = identical spectra."""
    import torchaudio
    total = 0.0
    for n_fft in (512, 1024, 2048):
        key = (n_fft, str(estimate.device))
        if key not in _MELS:
            _MELS[key] = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=n_fft, hop_length=n_fft // 4,
                                                              n_mels=64, power=1.0).to(estimate.device)
        mel = _MELS[key]
        total = total + (torch.log10(mel(estimate) + 1e-5) - torch.log10(mel(reference) + 1e-5)).abs().mean((-1, -2))
    return total / 3


def perplexity(codes: Tensor) -> list[float]:
    """Per level, exp(entropy) of the codes used over codes (B, levels, frames): how many codes the level
    effectively uses (1 = one code for everything, 1024 = all equally)."""
    out = []
    for level in codes.transpose(0, 1):
        p = torch.bincount(level.flatten(), minlength=CODEBOOK_SIZE).float()
        p = p / p.sum()
        out.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    return out


@torch.no_grad()
def evaluate(model: CodecModel, audio: Tensor, f0_hz: Tensor | None = None, bandwidths=(1.5, 6.0),
             batch_size: int = 8, measure: Callable[[np.ndarray, np.ndarray], dict] | None = None) -> dict:
    """On held-out notes audio (N, samples): per bandwidth, the loss (codec_loss, with the teacher f0 as in
    training), SI-SNR (dB), mel distance, perplexity per level, and whatever measure(originals, reconstructions)
    returns (train_codec.py: pitch and attack level kept, pitch.py; the reconstructions use the decoder's own f0,
    from the codes only). Returns {'bw1.5': {...}, 'bw6.0': {...}} and the reconstructions of the first bandwidth
    under 'audio'."""
    was_training = model.training
    model.eval()
    result, first = {}, None
    device = next(model.parameters()).device
    for bw in bandwidths:
        levels = BANDWIDTH_LEVELS[float(bw)]
        model.set_target_bandwidth(bw)
        recs, codes, losses = [], [], []
        for i in range(0, len(audio), batch_size):
            x = audio[i:i + batch_size].to(device)
            f0 = f0_hz[i:i + batch_size].to(device) if f0_hz is not None else None
            loss, _, _ = codec_loss(model, x, levels, f0)
            losses.append(float(loss) * len(x))
            c = model.encode(x)
            codes.append(c.cpu())
            recs.append(model.decode(c).cpu())
        rec, codes = torch.cat(recs), torch.cat(codes)
        ref = audio[:, :rec.shape[-1]].cpu()
        m = {"loss": sum(losses) / len(audio), "si_snr_db": float(si_snr(rec, ref).mean()),
             "mel_distance": float(mel_distance(rec, ref).mean()), "perplexity": perplexity(codes)}
        if measure is not None:
            m.update(measure(ref.numpy(), rec.numpy()))
        result[f"bw{float(bw)}"] = m
        first = rec if first is None else first
    model.train(was_training)
    result["audio"] = first
    return result


# ----------------------------------------------------------------------------------------------------
# The codec file: config + the weights inference needs

TRAINING_ONLY = ("embed_avg", "cluster_size", "inited")   # the codebooks' EMA state: a third of the file, unused
                                                          # by encode/decode


def inference_state(model: CodecModel) -> dict:
    """The state dict without the codebooks' EMA state (what a codec file and an LM checkpoint carry)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith(TRAINING_ONLY)}


def from_inference_state(config: dict, state: dict) -> CodecModel:
    """A CodecModel from a config dict and inference_state(). Raises TypeError/ValueError (config) or RuntimeError
    (weights that do not fit)."""
    model = CodecModel(CodecConfig(**config))
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(TRAINING_ONLY)]
    unexpected = [k for k in state if k not in own]
    misshapen = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:   # e.g. a codec file of an older codec.py: named, not a torch traceback
        raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {misshapen[:3]}; "
                           "written by another version of codec.py? train it again with train_codec.py")
    model.load_state_dict(state, strict=False)
    return model.eval()
