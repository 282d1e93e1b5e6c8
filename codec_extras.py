"""
What codec.py's story leaves out, for train_codec.py: the discriminator of --adversarial (EnCodec's multi-scale STFT
discriminator, its hinge loss and feature matching) and how a codec is judged on held-out notes (evaluate: the loss,
SI-SNR, mel distance and codebook perplexity at each bandwidth).
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codec import BANDWIDTH_LEVELS, CODEBOOK_SIZE, SAMPLE_RATE, CodecModel, codec_loss

# ----------------------------------------------------------------------------------------------------
# --adversarial: EnCodec's multi-scale STFT discriminator, hinge loss and feature matching


def make_discriminator() -> nn.Module:
    from encodec.msstftd import MultiScaleSTFTDiscriminator
    with warnings.catch_warnings():           # encodec uses the deprecated torch.nn.utils.weight_norm
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
# Evaluation on held-out notes

@torch.no_grad()
def evaluate(model: CodecModel, audio: Tensor, f0_hz: Tensor | None = None, bandwidths=(1.5, 6.0),
             batch_size: int | None = None, measure: Callable[[np.ndarray, np.ndarray], dict] | None = None) -> dict:
    """On held-out notes audio (N, samples): per bandwidth, the loss (codec_loss, with the teacher f0 as in
    training), SI-SNR (dB), mel distance, perplexity per level, and whatever measure(originals, reconstructions)
    returns (train_codec.py: pitch and attack level kept, pitch.py; the reconstructions use the decoder's own f0,
    from the codes only). Returns {'bw1.5': {...}, 'bw6.0': {...}} and the reconstructions of the first bandwidth
    under 'audio'. batch_size None: one note at a time on a CPU, where the synthesizer's (B, harmonics, samples)
    tensors of a larger batch outgrow the cache and run slower per note; 8 at a time elsewhere."""
    was_training = model.training
    model.eval()
    result, first = {}, None
    device = next(model.parameters()).device
    batch_size = batch_size or (1 if device.type == "cpu" else 8)
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
