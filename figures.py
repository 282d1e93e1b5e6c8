"""
Pictures, drawn with matplotlib: a note's spectrogram and a training run's curves.

- spectrogram: time across (s), frequency up on a log axis (Hz), level in colour with a dB colour bar, and
  horizontal lines at the asked and the measured pitch. sample.py draws one per note for its samples page.
- training_curves: from a log.jsonl written by train.py: the training and validation loss, the validation loss of
  each codec level, and the learning rate, side by side. train.py redraws OUT_DIR/curves.png after its
  evaluations (CurvesWriter); `python train.py --plot OUT_DIR` redraws it from any run's log.

matplotlib is imported inside the functions that draw (with the Agg backend: files only, no screen), because
importing it is slow and train.py starts many times (the tests, torchrun's processes) without drawing anything.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np

from files import atomic_write, read_log

SPECTROGRAM_LOW_HZ = 30.0   # the lowest frequency shown: below a guitar's (and the pitch tracker's) range
SPECTROGRAM_RANGE_DB = 80   # the colour scale: the loudest 80 dB
CURVES_MIN_INTERVAL_S = 10.0


def _figure(width_inches: float, height_inches: float):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # not pyplot: no global state, nothing to close
    return Figure(figsize=(width_inches, height_inches))  # margins set per figure: faster than a layout engine


# ----------------------------------------------------------------------------------------------------
# A note

def spectrogram(audio: np.ndarray, sr: int, path: str | Path, title: str,
                marks: dict[str, float] | None = None) -> Path:
    """Write the spectrogram of mono audio to path (PNG, 640 x 300 pixels) under title (one or two lines; a line
    too long for the picture loses its middle). marks = {label: Hz} draws a labelled horizontal line at each
    frequency (e.g. the asked and the measured pitch); a NaN or out-of-range one is left out. Levels are in dB
    relative to full scale: a full-scale sine reads 0 dB."""
    audio = np.nan_to_num(np.asarray(audio, dtype=np.float64))
    n_fft = 1 << math.ceil(math.log2(0.08 * sr))  # frames of at least 80 ms, so that 30 to 100 Hz notes resolve
    hop = n_fft // 8
    padded = np.pad(audio, (n_fft // 2, n_fft // 2 + max(0, n_fft - len(audio))))
    window = np.hanning(n_fft)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop] * window
    spectrum = np.abs(np.fft.rfft(frames, axis=1)).T * 2 / window.sum()  # (bins, frames), 1.0 = a full-scale sine
    db = 20 * np.log10(spectrum + 1e-10)
    hz = np.fft.rfftfreq(n_fft, 1 / sr)
    seconds = np.arange(db.shape[1]) * hop / sr
    shown = hz >= SPECTROGRAM_LOW_HZ * 0.9
    loudest = max(db.max(), -100.0)  # silence stays dark instead of being scaled up to full colour

    fig = _figure(6.4, 3.0)
    fig.subplots_adjust(left=0.11, right=1.0, bottom=0.15, top=0.87)
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(seconds, hz[shown], db[shown], shading="nearest", cmap="magma", rasterized=True,
                         vmin=loudest - SPECTROGRAM_RANGE_DB, vmax=loudest)
    ax.set_yscale("log")
    ax.set_ylim(SPECTROGRAM_LOW_HZ, sr / 2)
    ticks = [f for f in (50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000) if f <= sr / 2]
    ax.set_yticks(ticks, [f"{f // 1000}k" if f >= 1000 else str(f) for f in ticks])
    ax.minorticks_off()
    ax.set_xlim(0, len(audio) / sr)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")
    title = "\n".join(line if len(line) <= 100 else f"{line[:60]}...{line[-37:]}" for line in title.splitlines())
    ax.set_title(title, fontsize=9, parse_math=False)  # a "$" in a file name is no formula
    fig.colorbar(mesh, ax=ax, label="level (dB re full scale)", pad=0.01)
    styles = (("white", "--"), ("cyan", ":"), ("lime", "-."))  # dashed and dotted: two marks at one pitch both show
    drawn = False
    for (label, f), (colour, style) in zip((marks or {}).items(), styles):
        if SPECTROGRAM_LOW_HZ <= f <= sr / 2:  # also False for NaN
            ax.axhline(f, color=colour, linestyle=style, linewidth=1.2, label=f"{label} {f:.1f} Hz")
            drawn = True
    if drawn:
        ax.legend(loc="upper right", fontsize=8, facecolor="black", labelcolor="white", framealpha=0.6)
    path = Path(path)
    with warnings.catch_warnings():  # a title character the font lacks (CJK, say) is drawn as a box: no need to warn
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path


# ----------------------------------------------------------------------------------------------------
# A training run

def _series(entries: list[dict], value) -> tuple[list[int], list[float]]:
    """(iterations, values) of the entries where value(entry) is a finite number; missing keys are skipped."""
    xs, ys = [], []
    for entry in entries:
        try:
            y = float(value(entry))
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if math.isfinite(y):
            xs.append(entry["iter"])
            ys.append(y)
    return xs, ys


def training_curves(entries: list[dict], path: str | Path) -> Path:
    """Draw a run's evaluations (read_log's entries) as one PNG of three panels, written atomically (a reader
    never sees half a picture): loss, validation loss of each codec level (however many levels the log has),
    learning rate, all against the optimizer step."""
    if not entries:
        raise ValueError(f"{path}: no evaluations to draw")
    fig = _figure(13.0, 3.4)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.91, wspace=0.22)
    loss_ax, level_ax, lr_ax = fig.subplots(1, 3)

    for key, label, marker in (("train_loss", "training", None), ("val_loss", "validation", "o")):
        xs, ys = _series(entries, lambda e: e[key])
        if xs:
            loss_ax.plot(xs, ys, label=label, marker=marker, markersize=3)
    loss_ax.set_title("loss")
    loss_ax.set_ylabel("cross-entropy (nats/code)")
    loss_ax.legend(fontsize=8)

    levels = max((len(e["val_loss_per_level"]) for e in entries if isinstance(e.get("val_loss_per_level"), list)),
                 default=0)
    import matplotlib
    # up to 8 levels: distinct colours and a legend; more (up to 32): a colour scale, whose bar names the levels
    colours = matplotlib.colormaps["viridis"] if levels > 8 else matplotlib.colormaps["tab10"]
    for level in range(levels):
        xs, ys = _series(entries, lambda e: e["val_loss_per_level"][level])
        level_ax.plot(xs, ys, color=colours(level / (levels - 1) if levels > 8 else level), label=f"level {level}")
    level_ax.set_title("validation loss per codec level")
    level_ax.set_ylabel("cross-entropy (nats/code)")
    if 0 < levels <= 8:
        level_ax.legend(fontsize=8)
    elif levels > 8:
        scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, levels - 1), colours)
        fig.colorbar(scale, ax=level_ax, label="codec level", pad=0.01)

    xs, ys = _series(entries, lambda e: e["lr"])
    lr_ax.plot(xs, ys, color="tab:green")
    lr_ax.set_title("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    for ax in (loss_ax, level_ax, lr_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    return Path(path)


def curves_from_log(out_dir: str | Path) -> Path:
    """OUT_DIR/log.jsonl -> OUT_DIR/curves.png (train.py --plot). Errors are one line naming the file."""
    log = Path(out_dir) / "log.jsonl"
    try:
        entries = read_log(log)
    except OSError as e:
        raise ValueError(f"{log}: cannot read it ({e.strerror or e})") from None
    if not entries:
        raise ValueError(f"{log}: no evaluations in it (not a log.jsonl written by train.py?)")
    return training_curves(entries, Path(out_dir) / "curves.png")


def codec_curves(out_dir: str | Path) -> Path:
    """OUT_DIR/log.jsonl of train_codec.py -> OUT_DIR/curves.png: the codec's loss, then per evaluated bandwidth the
    share of held-out notes that kept their pitch, the rank correlation of their attack levels with the originals'
    (pitch.levels_kept), and the mel distance, against the optimizer step."""
    log = Path(out_dir) / "log.jsonl"
    entries = read_log(log)
    if not entries:
        raise ValueError(f"{log}: no evaluations in it")
    fig = _figure(13.0, 3.4)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.91, wspace=0.22)
    loss_ax, pitch_ax, mel_ax = fig.subplots(1, 3)
    for key, label, marker in (("train_loss", "training", None), ("val_loss", "held out", "o")):
        xs, ys = _series(entries, lambda e: e[key])
        if xs:
            loss_ax.plot(xs, ys, label=label, marker=marker, markersize=3)
    loss_ax.set_title("codec loss (codec.codec_loss)")
    bandwidths = sorted({bw for e in entries for bw in e.get("bandwidths", {})}, key=lambda b: float(b[2:]))
    for bw in bandwidths:
        label = f"{bw[2:]} kbps"
        xs, ys = _series(entries, lambda e: e["bandwidths"][bw]["pitch_kept"] / e["bandwidths"][bw]["pitch_measured"])
        line, = pitch_ax.plot(xs, ys, marker="o", markersize=3, label=f"{label}: pitch")
        xs, ys = _series(entries, lambda e: e["bandwidths"][bw]["attack_rank_correlation"])
        if xs:
            pitch_ax.plot(xs, ys, linestyle="--", color=line.get_color(), label=f"{label}: attack level order")
        xs, ys = _series(entries, lambda e: e["bandwidths"][bw]["mel_distance"])
        mel_ax.plot(xs, ys, marker="o", markersize=3, label=label)
    pitch_ax.set_title("kept: pitch (share within 50 cents), loudness (rank corr.)")
    pitch_ax.set_ylim(-0.02, 1.02)
    mel_ax.set_title("multi-scale mel distance, held-out notes")
    for ax in (loss_ax, pitch_ax, mel_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    path = Path(out_dir) / "curves.png"
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    return path


class CurvesWriter:
    """Redraws OUT_DIR/curves.png from OUT_DIR/log.jsonl after an evaluation (train.py's loop calls update).

    Drawing takes longer than a step of a small model, so a run that evaluates every step (as the tests do) would
    spend more time drawing than training: a redraw sooner than min_interval_s after the last one is skipped, except
    for the run's last evaluation. At the usual --eval-interval (minutes apart) every evaluation is drawn."""

    def __init__(self, out_dir: str | Path, min_interval_s: float = CURVES_MIN_INTERVAL_S, draw=None):
        self.out_dir = Path(out_dir)
        self.draw = draw or curves_from_log   # train_codec.py passes codec_curves
        self.min_interval_s = min_interval_s
        self.last = -math.inf
        self.warned = False

    def update(self, final: bool = False) -> None:
        if not final and time.monotonic() - self.last < self.min_interval_s:
            return
        self.last = time.monotonic()
        try:
            self.draw(self.out_dir)
        except Exception as e:  # a picture must never stop a training run: say so once and carry on
            if not self.warned:
                print(f"warning: cannot draw {self.out_dir / 'curves.png'} ({type(e).__name__}: {e}); "
                      "training goes on", flush=True)
                self.warned = True
