"""
The samples page: OUT_DIR/index.html, written by every sample.py run beside its WAVs, to listen to the notes and look
at them side by side in a browser; and the codec's reconstruction page (write_reconstruction_page), written by
train_codec.py: held-out notes beside what the codec gives back of them.

One row per note: an <audio controls> player, the note's spectrogram (figures.spectrogram), what was asked (pitch,
velocity, source, guidance, temperature, seed, checkpoint) and, after `sample.py --report`, what was measured
(pitch.py: the f0 and its error in cents by both trackers, Praat's and CREPE's, flagged where they disagree; the peak
and attack levels). On top, the run's summary: pitch accuracy, how well loudness follows velocity, CREPE's scores
and the notes the trackers disagree on.

Every link is relative (a file name, percent-encoded) and the style sheet is inline, with no script, so the folder
can be opened from the file system, served or copied anywhere as it is. Every name and value is HTML-escaped: a file
named `it's <b> & "x".wav` shows as such.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from files import atomic_write
from pitch import NoteResult, PitchSummary, midi_to_hz, note_name, read_mono

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
.run, small { color: #555; }
.summary { font-size: 1.1em; margin: .8em 0; padding: .5em .8em; background: #f3f3f3; border-radius: 4px; }
.summary p { margin: .2em 0; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: .4em .6em; text-align: left; vertical-align: top; }
td.file { max-width: 22em; overflow-wrap: anywhere; }
td.asked, td.measured { white-space: nowrap; }
audio { display: block; width: 18em; margin-top: .3em; }
img { display: block; width: 448px; height: auto; }
img.small { width: 320px; }
.miss { color: #b00020; }
.hit { color: #17702a; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def link(path: Path) -> str:
    """A relative, percent-encoded link to a file beside the page, escaped for an attribute."""
    return esc(quote(path.name))


def draw_missing_spectrograms(notes: list[NoteResult]) -> None:
    """A spectrogram PNG beside each WAV that has none yet (notes not measured by --report), the asked pitch marked."""
    from figures import spectrogram  # matplotlib, only when drawing
    for note in notes:
        if note.png is not None or note.problem:
            continue
        audio, sr = read_mono(note.path)
        marks, title = {}, note.path.name
        if note.midi is not None:
            marks["asked"] = midi_to_hz(note.midi)
            title += f"\nasked {note_name(note.midi)} ({marks['asked']:.1f} Hz)"
        note.png = spectrogram(audio, sr, note.path.with_suffix(".png"), title, marks)


def asked_cell(note: NoteResult, settings: dict[str, str]) -> str:
    """The note's conditions, then the sampling settings short enough to repeat on every row (the checkpoint and
    the prompt, long paths, are said once on top)."""
    pitch = "unknown" if note.midi is None else f"{note.midi} ({note_name(note.midi)}, {midi_to_hz(note.midi):.1f} Hz)"
    velocity = "unknown" if note.velocity is None else note.velocity
    rest = " · ".join(f"{label} {settings[label]}" for label in ("cfg", "temperature", "seed"))
    source = note.source or settings["source"]
    return (f"pitch {esc(pitch)}<br>velocity {esc(velocity)}<br>source {esc(source)}<br>"
            f"<small>{esc(rest)}</small>")


def measured_cell(note: NoteResult, measured: bool) -> str:
    if not measured:
        return "<small>not measured (sample.py --report)</small>"
    if note.problem:
        return f'<span class="miss">{esc(note.problem)}</span>'
    lines = [tracker_verdict("Praat", note.f0, note.cents, note.ok)]
    if note.crepe is not None:
        lines.append(tracker_verdict("CREPE", note.crepe.f0, note.crepe_cents, note.crepe_ok)
                     + f" <small>(RPA {100 * note.crepe.rpa:.0f}%)</small>")
        if note.trackers_disagree:
            lines.append('<span class="miss">the trackers disagree</span>')
    return "<br>".join(lines + [f"peak {note.peak_db:.1f} dBFS", f"attack {note.attack_db:.1f} dBFS"])


def tracker_verdict(tracker: str, f0: float, cents: float, ok: bool) -> str:
    """'Praat f0 146.9 Hz, within +1 cents' (green), 'off by' (red), or 'no pitch found'."""
    if math.isnan(f0):
        return f'{tracker}: <span class="miss">no pitch found</span>'
    verdict = ("hit", "within") if ok else ("miss", "off by")
    return f'{tracker} f0 {f0:.1f} Hz, <span class="{verdict[0]}">{verdict[1]} {cents:+.0f} cents</span>'


def write_samples_page(out_dir: str | Path, settings: dict[str, str], notes: list[NoteResult],
                       summary: PitchSummary | None) -> Path:
    """Write index.html into out_dir for notes (NoteResults of the WAVs there: measured ones when summary is given,
    i.e. after --report), drawing the spectrograms they lack first. settings: what was asked that is the same for
    every note, label -> value (a note's own pitch and velocity come from its NoteResult). Returns the page's path."""
    out_dir = Path(out_dir)
    draw_missing_spectrograms(notes)
    if summary is None:
        summary_html = ("<p>Not measured: run sample.py with <code>--report</code> (and <code>--pitch</code>) to "
                        "measure each note's pitch and loudness.</p>")
    else:
        summary_html = "".join(f"<p>{esc(line)}</p>" for line in summary.lines)
    rows = []
    for i, note in enumerate(notes, 1):
        picture = (f'<img src="{link(note.png)}" alt="spectrogram of {esc(note.path.name)}">' if note.png
                   else "<small>no picture</small>")
        rows.append(f'<tr id="note{i}"><td>{i}</td>'
                    f'<td class="file"><a href="{link(note.path)}">{esc(note.path.name)}</a>'
                    f'<audio controls preload="metadata" src="{link(note.path)}"></audio></td>'
                    f'<td class="asked">{asked_cell(note, settings)}</td>'
                    f'<td class="measured">{measured_cell(note, summary is not None)}</td>'
                    f"<td>{picture}</td></tr>")
    run = " · ".join(f"{label} {value}" for label, value in settings.items())
    return write_page(out_dir, "codecgpt samples", f"{len(notes)} notes · {run}", summary_html,
                      ["#", "note", "asked", "measured", "spectrogram"], rows)


@dataclass
class Reconstruction:
    """One held-out note through the codec: its WAV, the WAVs the codec gave back at each bandwidth (kbps -> path),
    each with a spectrogram PNG beside it, and pitch.py's f0 of each (Hz; NaN where none was found)."""
    what: str                       # the set it comes from (the test split, a folder)
    name: str                       # the note's file name there
    original: Path
    reconstructions: dict[float, Path]
    f0: dict[str, float]            # "original" and each bandwidth's str(kbps) -> Hz


def write_reconstruction_page(out_dir: str | Path, notes: list[Reconstruction], summary_lines: list[str]) -> Path:
    """OUT_DIR/index.html of a codec's reconstructions (train_codec.py writes it at the end): per note the original
    and what the codec gave back at each bandwidth, players and spectrograms side by side, and whether the pitch
    was kept (within 50 cents of the original's). Returns the page's path."""
    bandwidths = sorted({bw for n in notes for bw in n.reconstructions})
    rows = []
    for i, note in enumerate(notes, 1):
        cells = [player_cell(note.original, f"f0 {note.f0['original']:.1f} Hz")]
        for bw in bandwidths:
            f0, ref = note.f0[str(bw)], note.f0["original"]
            cents = 1200 * math.log2(f0 / ref) if f0 > 0 and ref > 0 else math.nan
            verdict = ('<span class="miss">no pitch found</span>' if math.isnan(cents) else
                       f'<span class="{"hit" if abs(cents) <= 50 else "miss"}">{cents:+.0f} cents</span>')
            cells.append(player_cell(note.reconstructions[bw], f"f0 {f0:.1f} Hz, {verdict}"))
        rows.append(f'<tr id="note{i}"><td>{i}</td><td class="file">{esc(note.what)}<br>'
                    f'{esc(note.name)}</td>{"".join(cells)}</tr>')
    summary_html = "".join(f"<p>{esc(line)}</p>" for line in summary_lines)
    return write_page(out_dir, "codecgpt codec: held-out notes and their reconstructions", f"{len(notes)} notes",
                      summary_html, ["#", "note", "original"] + [f"{bw:g} kbps" for bw in bandwidths], rows)


def player_cell(wav: Path, line: str) -> str:
    """A player and the spectrogram of a WAV beside the page, and a line of what was measured on it."""
    png = wav.with_suffix(".png")
    return (f'<td><audio controls preload="metadata" src="{link(wav)}"></audio><small>{line}</small>'
            f'<img class="small" src="{link(png)}" alt="spectrogram of {esc(wav.name)}"></td>')


def write_page(out_dir: str | Path, heading: str, run: str, summary_html: str, columns: list[str],
               rows: list[str]) -> Path:
    """OUT_DIR/index.html: the heading, a line about the run, the summary and a table of rows (already HTML)."""
    out_dir = Path(out_dir)
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{esc(heading)}: {esc(out_dir.resolve().name)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{esc(heading)}</h1>
<p class="run">{esc(run)} · written {datetime.now():%Y-%m-%d %H:%M}</p>
<div class="summary">{summary_html}</div>
<table>
<thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
</body>
</html>
"""
    path = out_dir / "index.html"
    atomic_write(path, lambda f: f.write(page.encode("utf-8")))  # a full disk leaves the previous page whole
    return path
