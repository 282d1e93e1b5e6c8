"""
The codec trained here: audio <-> EnCodec-shaped codes (2 to 32 residual codebooks of 1024 codes, 75 frames/s).

    audio --SpectralEncoder--> latent (B, 128, frames) --quantize--> codes (B, levels, frames)
          --HarmonicNoiseDecoder--> per frame: f0, partials' amplitudes, noise envelope
          --harmonic_synth + filtered_noise--> audio

The decoder is told what a note is made of (DDSP, Engel et al. 2020): partials at whole multiples of an f0, plus
noise. In training the note's known f0 drives the synthesis and the f0 head learns it; at inference only the codes.

Sections: 1 encoder, 2 residual quantizer, 3 synthesis, 4 decoder, 5 CodecModel, 6 codec_loss, 7 the codec file;
then, to skip on a first read, the published architecture (size "encodec"). The discriminator and the metrics are
in codec_extras.py; docs/codec.md has the design's reasons and measurements.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# EnCodec's 24 kHz constants (data.py has the same; codec.py imports nothing of the project)
SAMPLE_RATE = 24_000
FRAME_RATE = 75
HOP = SAMPLE_RATE // FRAME_RATE                                   # 320 samples per frame
BANDWIDTH_LEVELS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}   # kbps -> number of codebooks
CODEBOOK_SIZE = 1024
MAX_LEVELS = 32


@dataclass
class CodecConfig:
    size: str = "small"               # 'small' or 'encodec' (the published architecture)
    latent_dim: int = 128             # the quantizer's dimension (EnCodec's is 128)
    # the encoder and decoder
    width: int = 256                  # channels of the ConvNeXt blocks
    encoder_blocks: int = 2
    decoder_blocks: int = 4
    n_fft: int = 2048                 # the encoder's STFT: 11.7 Hz bins resolve an 82 Hz note's partials
    loudness_gain: float = 32.0       # scale of the encoder's loudness channels
    harmonics: int = 64               # partials of the harmonic synthesizer
    noise_bands: int = 65             # the noise envelope's linear bands, 0-12 kHz
    f0_min_midi: float = 23.0         # the f0 classes: 20-cent bins from MIDI 23 to 108 (pitch.py's range)
    f0_max_midi: float = 108.0
    f0_cents_per_bin: float = 20.0
    # the quantizer
    ema_decay: float = 0.95           # codebook EMA over about 20 steps: the latents move fast early on
    dead_code_fraction: float = 0.1   # a code is dead below this fraction of the average use per code (EMA)
    # loss weights, fixed (the encodec package has no loss balancer)
    w_l1: float = 0.0                 # waveform L1: the synthesizer's phases are its own, L1 would pull to silence
    w_stft: float = 1.0               # multi-resolution STFT
    w_harmonic: float = 1.0           # each partial's log amplitude vs the input's
    w_f0: float = 1.0                 # f0 cross-entropy
    w_commit: float = 1.0             # commitment, summed over levels
    w_loudness: float = 1.0           # each frame's log RMS vs the input's
    w_adv: float = 3.0                # --adversarial (codec_extras.py), EnCodec's weights
    w_feat: float = 3.0

    def __post_init__(self):
        if self.size not in ("small", "encodec"):
            raise ValueError(f"codec size must be 'small' or 'encodec', got {self.size!r}")

    @property
    def f0_bins(self) -> int:
        return int(round((self.f0_max_midi - self.f0_min_midi) * 100 / self.f0_cents_per_bin)) + 1


# ----------------------------------------------------------------------------------------------------
# 1. The encoder: log-magnitude STFT frames through ConvNeXt blocks

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
    """Log-magnitude STFT frames -> ConvNeXt blocks -> latent (B, latent_dim, frames). Each frame's spectrum is
    normalised, so the codes group frames by pitch, not loudness; the loudness comes in as three channels."""

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
        level = torch.logsumexp(2 * spec, 1, keepdim=True) / 2      # log sqrt(energy): the frame's level
        loud = torch.cat([mean, std, level], 1) / 5 * self.loudness_gain  # /5: log magnitudes span about -11..3
        x = torch.cat([(spec - mean) / (std + 1e-5), loud], 1)
        x = self.blocks(self.inp(x))
        return self.out(self.norm(x.transpose(1, 2)).transpose(1, 2))


# ----------------------------------------------------------------------------------------------------
# 2. The residual quantizer: each level codes what the levels before it left over. The codebooks are the encodec
# package's (embed, and the EMA state embed_avg, cluster_size); the loop, the EMA step and the k-means are ours.

def nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid for each row of x (N, D)."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)).argmin(1)


def quantize(latent: Tensor, books: list, update: bool, decay: float, dead_fraction: float
             ) -> tuple[Tensor, Tensor, Tensor]:
    """latent (B, D, frames) through one codebook per level -> (quantized latent, codes (B, levels, frames),
    commitment per level); with update, each codebook takes an EMA step. The residuals are made of detached codes,
    so every level's commitment reaches the encoder."""
    B, D, T = latent.shape
    residual, total, codes, commit = latent, torch.zeros_like(latent), [], []
    for book in books:
        flat = residual.detach().transpose(1, 2).reshape(-1, D)
        idx = nearest(flat, book.embed)
        q = book.embed[idx].view(B, T, D).transpose(1, 2)   # before the update: what encode() would give
        if update:
            update_codebook(book, flat, idx, decay, dead_fraction)
        commit.append(F.mse_loss(residual, q))
        residual = residual - q
        total = total + q
        codes.append(idx.view(B, T))
    quantized = latent + (total - latent).detach()   # straight-through: the decoder's gradients reach the encoder
    return quantized, torch.stack(codes, 1), torch.stack(commit)


@torch.no_grad()
def update_codebook(book, x: Tensor, idx: Tensor, decay: float, dead_fraction: float) -> None:
    """One EMA step of a codebook towards the frames x (N, D) it coded as idx. A dead code (EMA use below
    dead_fraction of the average) restarts at a random frame, with the average use as its count."""
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


@torch.no_grad()
def fit_codebooks(books: list, frames: Tensor, iters: int, seed: int) -> None:
    """Every codebook from residual k-means on frames (N, D): level 1 clusters the frames, level 2 what is left."""
    gen = torch.Generator().manual_seed(seed)
    residual = frames
    for book in books:
        centroids = kmeans(residual, CODEBOOK_SIZE, iters, gen)
        residual = residual - centroids[nearest(residual, centroids)]
        book.embed.copy_(centroids)
        book.embed_avg.copy_(centroids)
        book.cluster_size.fill_(1.0)    # so that embed_avg / cluster_size is embed
        book.inited.fill_(1.0)


# ----------------------------------------------------------------------------------------------------
# 3. Harmonic-plus-noise synthesis (DDSP's synths.py): per-frame controls -> samples, nothing learned

def frames_to_samples(x: Tensor, samples: int) -> Tensor:
    """(B, C, frames) -> (B, C, samples), linear between frame centres."""
    return F.interpolate(x, size=samples, mode="linear", align_corners=False)


def harmonic_synth(f0: Tensor, amplitudes: Tensor) -> Tensor:
    """Sines at whole multiples of f0 (B, frames) Hz with amplitudes (B, K, frames), zero above Nyquist -> audio."""
    B, K, frames = amplitudes.shape
    samples = frames * HOP
    k = torch.arange(1, K + 1, device=f0.device, dtype=f0.dtype)
    f0_s = frames_to_samples(f0[:, None], samples)[:, 0]                  # (B, samples)
    amp_s = frames_to_samples(amplitudes, samples)                        # (B, K, samples)
    # phase in cycles, kept in [0, 1): a note runs to thousands of cycles, where float32 would lose the phase.
    # k * cycles then stays below K, exact to a few millionths of a cycle, so the big (B, K, samples) tensor needs
    # no second mod: sin(2 pi k c) == sin(2 pi (k c mod 1)).
    cycles = torch.cumsum(f0_s / SAMPLE_RATE, dim=-1) % 1.0
    # Schroeder's start phases pi k (k - 1) / K: the partials do not all peak together
    start = math.pi * k * (k - 1) / K
    partials = torch.sin(2 * math.pi * k[None, :, None] * cycles[:, None] + start[None, :, None])
    return (amp_s * partials).sum(1)


def filtered_noise(envelope: Tensor, seed: int | None = None) -> Tensor:
    """Noise shaped by envelope (B, bands, frames), linear bands 0 Hz to Nyquist -> audio: an STFT of the envelope's
    magnitudes at random phases, drawn from seed (None: torch's global random stream)."""
    B, _, frames = envelope.shape
    n_fft = 2 * HOP
    bins = n_fft // 2 + 1
    env = F.interpolate(envelope.transpose(1, 2), size=bins, mode="linear", align_corners=True).transpose(1, 2)
    gen = torch.Generator(device=envelope.device).manual_seed(seed) if seed is not None else None
    phase = torch.rand(B, bins, frames + 1, device=envelope.device, generator=gen) * 2 * math.pi
    spec = torch.polar(F.pad(env, (0, 1)), phase)                              # istft wants frames + 1 columns
    window = torch.hann_window(n_fft, device=envelope.device)
    return torch.istft(spec, n_fft, HOP, window=window, center=True, length=frames * HOP)


# ----------------------------------------------------------------------------------------------------
# 4. The decoder: latent -> per-frame controls -> the synthesis above

def exp_sigmoid(x: Tensor) -> Tensor:
    """DDSP's positive output: 2 sigmoid(x)^ln(10) + 1e-7, from 1e-7 to 2, smooth in log scale."""
    return 2.0 * torch.sigmoid(x) ** math.log(10.0) + 1e-7


def inverse_exp_sigmoid(y: Tensor) -> Tensor:
    """x with exp_sigmoid(x) == y (for initial biases)."""
    s = ((y - 1e-7).clamp(min=1e-12) / 2) ** (1 / math.log(10.0))
    return torch.log(s / (1 - s))


class HarmonicNoiseDecoder(nn.Module):
    """Latent (B, latent_dim, frames) -> ConvNeXt blocks -> per frame: f0 logits, an amplitude, its distribution
    over the partials, a noise envelope -> the synthesis. The pitch is exact once the f0 is right."""

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
            # start from a quiet plausible note (partials as 1/k, little noise), not a loud random one
            k = torch.arange(1, cfg.harmonics + 1, dtype=torch.float)
            self.amplitude_head.bias.fill_(float(inverse_exp_sigmoid(torch.tensor(0.1))))
            self.distribution_head.bias.copy_(-torch.log(k))
            self.noise_head.bias.fill_(float(inverse_exp_sigmoid(torch.tensor(1e-4))))

    def forward(self, latent: Tensor, f0_hz: Tensor | None = None, noise_seed: int | None = None
                ) -> tuple[Tensor, dict]:
        """Latent -> (audio, controls). The synthesis plays the teacher f0_hz (B,) where known, else the f0 head's."""
        if noise_seed is None and not self.training:
            noise_seed = 0    # evaluation leaves the global random stream alone (exact resume)
        c = self.controls(latent)
        f0 = self.f0_from_logits(c["f0_logits"].detach())                    # (B, frames)
        if f0_hz is not None:
            known = torch.isfinite(f0_hz)
            f0 = torch.where(known[:, None], f0_hz.nan_to_num(1.0)[:, None].to(f0), f0)
        c["harmonics"] = self.harmonic_amplitudes(f0, c.pop("amplitude"), c.pop("distribution"))
        return harmonic_synth(f0, c["harmonics"]) + filtered_noise(c["noise"], noise_seed), c

    def controls(self, latent: Tensor) -> dict:
        h = self.norm(self.blocks(self.inp(latent)).transpose(1, 2))          # (B, frames, width)
        return {"f0_logits": self.f0_head(h),                                 # (B, frames, f0_bins)
                "amplitude": exp_sigmoid(self.amplitude_head(h)).transpose(1, 2),  # (B, 1, frames)
                "distribution": self.distribution_head(h).transpose(1, 2),  # (B, K, frames) logits
                "noise": exp_sigmoid(self.noise_head(h)).transpose(1, 2)}     # (B, bands, frames)

    def f0_from_logits(self, logits: Tensor) -> Tensor:
        """The f0 (Hz) per frame: the probability-weighted mean of the most likely bin and two on each side."""
        probs = logits.softmax(-1)
        best = probs.argmax(-1, keepdim=True)
        idx = (best + torch.arange(-2, 3, device=logits.device)).clamp(0, self.cfg.f0_bins - 1)
        w = probs.gather(-1, idx)
        bins = (w * idx).sum(-1) / w.sum(-1).clamp(min=1e-9)
        midi = self.cfg.f0_min_midi + bins * self.cfg.f0_cents_per_bin / 100
        return 440.0 * 2 ** ((midi - 69) / 12)

    def harmonic_amplitudes(self, f0: Tensor, amplitude: Tensor, distribution: Tensor) -> Tensor:
        """Each partial's amplitude (B, K, frames): amplitude (B, 1, frames) shared out by a softmax of distribution
        (B, K, frames) over the partials below Nyquist (those above would alias), as DDSP does."""
        k = torch.arange(1, distribution.shape[1] + 1, device=f0.device, dtype=f0.dtype)
        audible = k[None, :, None] * f0[:, None, :] < SAMPLE_RATE / 2
        return amplitude * distribution.masked_fill(~audible, -torch.inf).softmax(1)


# ----------------------------------------------------------------------------------------------------
# 5. The codec: encoder -> quantizer -> decoder, at a bandwidth

@dataclass
class CodecOutput:
    audio: Tensor                     # (B, samples) the reconstruction
    codes: Tensor                     # (B, levels, frames)
    commit: Tensor                    # (levels,) commitment loss of each level
    controls: dict = field(default_factory=dict)   # the decoder's f0_logits, harmonics, noise


class CodecModel(nn.Module):
    """encode / decode for other code, forward for codec_loss (make_codec builds the one a config asks for)."""

    def __init__(self, cfg: CodecConfig | None = None):
        super().__init__()
        from encodec.quantization import ResidualVectorQuantizer
        self.cfg = cfg = cfg or CodecConfig()
        self.encoder = SpectralEncoder(cfg)
        self.decoder = HarmonicNoiseDecoder(cfg)
        # the package's codebooks; kmeans_init=False: init_codebooks fits them on more frames than one batch
        self.quantizer = ResidualVectorQuantizer(dimension=cfg.latent_dim, n_q=MAX_LEVELS, bins=CODEBOOK_SIZE,
                                                 decay=cfg.ema_decay, kmeans_init=False)
        self.levels = BANDWIDTH_LEVELS[1.5]

    def set_target_bandwidth(self, bandwidth: float) -> None:
        """Levels used by encode() from now on (1.5 kbps = 2 ... 24 kbps = 32)."""
        self.levels = BANDWIDTH_LEVELS[float(bandwidth)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def codebooks(self) -> list:
        return [layer._codebook for layer in self.quantizer.vq.layers]

    def latent(self, audio: Tensor) -> Tensor:
        """(B, samples) -> (B, latent_dim, samples // HOP)."""
        return self.encoder(audio)

    def synth(self, quantized: Tensor, f0_hz: Tensor | None = None, noise_seed: int | None = None
              ) -> tuple[Tensor, dict]:
        """Quantized latent -> (audio (B, samples), controls)."""
        return self.decoder(quantized, f0_hz, noise_seed)

    def forward(self, audio: Tensor, levels: int, f0_hz: Tensor | None = None) -> CodecOutput:
        quantized, codes, commit = quantize(self.latent(audio), self.codebooks()[:levels], self.training,
                                            self.cfg.ema_decay, self.cfg.dead_code_fraction)
        out, controls = self.synth(quantized, f0_hz)
        return CodecOutput(out, codes, commit, controls)

    @torch.no_grad()
    def encode(self, audio: Tensor) -> Tensor:
        """audio (B, samples) at 24 kHz -> codes (B, levels, samples // 320) at the set bandwidth."""
        return self.quantizer.vq.encode(self.latent(audio), n_q=self.levels).transpose(0, 1)

    @torch.no_grad()
    def decode(self, codes: Tensor, noise_seed: int | None = 0) -> Tensor:
        """codes (B, levels, frames) -> audio (B, frames * 320); the same codes and noise_seed, the same samples."""
        return self.synth(self.dequantize(codes), noise_seed=noise_seed)[0]

    def dequantize(self, codes: Tensor) -> Tensor:
        """codes (B, levels, frames) -> the quantized latent (B, latent_dim, frames)."""
        return self.quantizer.vq.decode(codes.transpose(0, 1))

    @torch.no_grad()
    def init_codebooks(self, audio: Tensor, iters: int = 10, seed: int = 0) -> None:
        """Every level's codebook from residual k-means (fit_codebooks) on the latents of audio (B, samples)."""
        latent = torch.cat([self.latent(chunk) for chunk in audio.split(16)])
        fit_codebooks(self.codebooks(), latent.transpose(1, 2).reshape(-1, latent.shape[1]), iters, seed)


def make_codec(cfg: CodecConfig | None = None) -> CodecModel:
    """The codec a config asks for: CodecModel ('small'), or PublishedCodec ('encodec', at the end of this file)."""
    cfg = cfg or CodecConfig()
    return PublishedCodec(cfg) if cfg.size == "encodec" else CodecModel(cfg)


# ----------------------------------------------------------------------------------------------------
# 6. The loss: one function for training and evaluation

_STFT_LOSSES: dict = {}


def codec_loss(model: CodecModel, audio: Tensor, levels: int, f0_hz: Tensor | None = None
               ) -> tuple[Tensor, dict, CodecOutput]:
    """The loss of reconstructing audio (B, samples) through `levels` codebooks: (weighted total, each part as a
    float, the model's output). f0_hz (B,) is the teacher f0 (NaN where unknown)."""
    cfg = (model.module if hasattr(model, "module") else model).cfg   # under DDP, the config is on the module
    out = model(audio, levels, f0_hz)
    target = audio[..., :out.audio.shape[-1]]
    parts = {"stft": stft_loss(audio.device)(out.audio[:, None], target[:, None]),
             "l1": F.l1_loss(out.audio, target),
             "commit": out.commit.sum()}
    total = cfg.w_stft * parts["stft"] + cfg.w_l1 * parts["l1"] + cfg.w_commit * parts["commit"]
    if cfg.w_loudness:
        parts["loudness"] = (frame_level(out.audio) - frame_level(target)).abs().mean()
        total = total + cfg.w_loudness * parts["loudness"]
    if out.controls and f0_hz is not None and torch.isfinite(f0_hz).any():   # a harmonic decoder, a known f0
        parts["f0"], parts["harmonic"] = teacher_losses(cfg, out.controls, target, f0_hz)
        total = total + cfg.w_f0 * parts["f0"] + cfg.w_harmonic * parts["harmonic"]
    return total, {k: float(v.detach()) for k, v in parts.items()}, out


def stft_loss(device) -> nn.Module:
    """auraloss's multi-resolution STFT loss, windows 2048 (low notes' partials) to 256 samples (the onset)."""
    import auraloss
    key = str(device)
    if key not in _STFT_LOSSES:
        sizes = [2048, 1024, 512, 256]
        _STFT_LOSSES[key] = auraloss.freq.MultiResolutionSTFTLoss(
            fft_sizes=sizes, hop_sizes=[s // 4 for s in sizes], win_lengths=sizes, eps=1e-7).to(device)
    return _STFT_LOSSES[key]


def frame_level(audio: Tensor) -> Tensor:
    """(B, samples) -> the log RMS of each 320-sample frame (B, frames), floored at -80 dB."""
    rms = audio.reshape(audio.shape[0], -1, HOP).pow(2).mean(-1).add(1e-8).sqrt()
    return torch.log(rms + 1e-4)


def teacher_losses(cfg: CodecConfig, controls: dict, target: Tensor, f0_hz: Tensor) -> tuple[Tensor, Tensor]:
    """Where the teacher f0 is known: (f0 cross-entropy, each audible partial's log amplitude vs the input's)."""
    known = torch.isfinite(f0_hz)
    f0 = f0_hz[known].to(target)
    logits = controls["f0_logits"][known]                                # (b, frames, bins)
    f0_loss = F.cross_entropy(logits.flatten(0, 1), f0_class(cfg, f0)[:, None].expand(-1, logits.shape[1]).flatten())
    wanted = harmonic_targets(target[known], f0, cfg.harmonics, cfg.n_fft)
    got = controls["harmonics"][known]
    audible = torch.arange(1, cfg.harmonics + 1, device=f0.device)[None] * f0[:, None] < SAMPLE_RATE / 2
    diff = (torch.log(got + 1e-4) - torch.log(wanted + 1e-4)).abs() * audible[..., None]   # floored at -80 dB
    return f0_loss, diff.sum() / (audible.sum() * diff.shape[-1]).clamp(min=1)


def f0_class(cfg: CodecConfig, f0_hz: Tensor) -> Tensor:
    """Hz -> the nearest 20-cent bin (long)."""
    midi = 69 + 12 * torch.log2(f0_hz / 440.0)
    return ((midi - cfg.f0_min_midi) * 100 / cfg.f0_cents_per_bin).round().long().clamp(0, cfg.f0_bins - 1)


def harmonic_targets(audio: Tensor, f0_hz: Tensor, harmonics: int, n_fft: int = 2048) -> Tensor:
    """The input's amplitude at each partial k * f0 (B, K, frames): the larger STFT bin beside k f0, scaled so that
    a sine of amplitude A reads A."""
    window = torch.hann_window(n_fft, device=audio.device)
    mag = torch.stft(audio, n_fft, HOP, window=window, center=True, return_complex=True).abs()
    mag = mag[..., :audio.shape[-1] // HOP] * 2 / window.sum()               # (B, bins, frames)
    k = torch.arange(1, harmonics + 1, device=audio.device, dtype=audio.dtype)
    pos = (k[None] * f0_hz[:, None] * n_fft / SAMPLE_RATE).clamp(max=mag.shape[1] - 2)  # (B, K)
    lo = pos.floor().long()
    idx = torch.stack([lo, lo + 1], -1).view(audio.shape[0], -1)
    picked = mag.gather(1, idx[..., None].expand(-1, -1, mag.shape[-1]))
    return picked.view(audio.shape[0], harmonics, 2, -1).amax(2)


# ----------------------------------------------------------------------------------------------------
# 7. The codec file: config + the weights inference needs

TRAINING_ONLY = ("embed_avg", "cluster_size", "inited")   # the codebooks' EMA state, unused by encode/decode


def inference_state(model: CodecModel) -> dict:
    """The state dict without the codebooks' EMA state (what a codec file and an LM checkpoint carry)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith(TRAINING_ONLY)}


def from_inference_state(config: dict, state: dict) -> CodecModel:
    """A CodecModel from a config dict and inference_state(). Raises TypeError/ValueError (config) or RuntimeError
    (weights that do not fit)."""
    model = make_codec(CodecConfig(**config))
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(TRAINING_ONLY)]
    unexpected = [k for k in state if k not in own]
    misshapen = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:   # e.g. a codec file of an older codec.py: named, not a torch traceback
        raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {misshapen[:3]}; "
                           "written by another version of codec.py? train it again with train_codec.py")
    model.load_state_dict(state, strict=False)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Skip on a first read: the published architecture, CodecConfig(size="encodec") (train_codec.py --size encodec)

class PublishedCodec(CodecModel):
    """EnCodec's 24 kHz SEANet encoder and decoder around the same quantizer, for GPUs. `self.net` is an
    encodec.EncodecModel, so the released weights load with model.net.load_state_dict(...)."""

    def __init__(self, cfg: CodecConfig):
        nn.Module.__init__(self)                  # not CodecModel's: none of its encoder and decoder
        from encodec import EncodecModel
        self.cfg = cfg
        with warnings.catch_warnings():           # encodec uses the deprecated torch.nn.utils.weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            self.net = EncodecModel.encodec_model_24khz(pretrained=False)
        self.quantizer = self.net.quantizer       # one module, two names in the state dict
        self.levels = BANDWIDTH_LEVELS[1.5]

    def latent(self, audio: Tensor) -> Tensor:
        return self.net.encoder(audio[:, None])[..., :audio.shape[-1] // HOP]

    def synth(self, quantized: Tensor, f0_hz: Tensor | None = None, noise_seed: int | None = None
              ) -> tuple[Tensor, dict]:
        return self.net.decoder(quantized)[:, 0], {}
