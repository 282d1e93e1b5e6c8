"""figures.py: training curves from any log.jsonl (train.py draws them after evaluations, --plot redraws them), and
the spectrogram's size."""
import json
import math
import os
import struct

import numpy as np
import pytest

import figures
import files
from conftest import run

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # width and height, from the IHDR chunk


def fake_log(levels: int, evaluations: int = 6, extra: dict | None = None) -> list[dict]:
    return [{"iter": 50 * i, "train_loss": None if i == 0 else 3 + 4 * math.exp(-i),
             "val_loss": 3.2 + 4 * math.exp(-i), "val_loss_per_level": [3 + 4 * math.exp(-i) + 0.1 * k
                                                                        for k in range(levels)],
             "val_accuracy": 0.1 * i, "lr": 1e-3 * min(1.0, (i + 1) / 3), "elapsed_s": 1.0 * i, **(extra or {})}
            for i in range(evaluations)]


@pytest.mark.parametrize("levels", [1, 2, 32])
def test_curves_from_logs_of_any_number_of_levels(tmp_path, levels):
    """1, 2 or 32 codec levels, a first evaluation without a training loss, keys the plot does not know, and a last
    line cut short by a kill: the curves are drawn, atomically (no temporary file left)."""
    entries = fake_log(levels, extra={"val_nats_per_frame": 7.0})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"iter": 300, "val_lo')
    assert len(files.read_log(tmp_path / "log.jsonl")) == len(entries)
    path = figures.curves_from_log(tmp_path)
    assert path == tmp_path / "curves.png"
    width, height = png_size(path)
    assert width > 1000 and 250 < height < width / 2  # three panels side by side
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "log.jsonl"]


def test_curves_skip_values_that_are_not_numbers(tmp_path):
    entries = fake_log(2)
    entries[2]["val_loss"], entries[3]["lr"], entries[4]["val_loss_per_level"] = None, "n/a", [float("nan")]
    figures.training_curves(entries, tmp_path / "c.png")
    assert png_size(tmp_path / "c.png")[0] > 1000
    assert figures._series(entries, lambda e: e["val_loss"])[0] == [0, 50, 150, 200, 250]
    assert figures._series(entries, lambda e: e["val_loss_per_level"][1])[0] == [0, 50, 100, 150, 250]


@pytest.mark.slow
def test_training_writes_curves_and_plot_redraws_them(trained, tmp_path):
    """train.py leaves out/curves.png after its last evaluation; `train.py --plot OUT_DIR` draws it again from the log
    alone, and a folder without a log is one error line naming it."""
    work, out, _ = trained
    assert png_size(out / "curves.png")[0] > 1000
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "log.jsonl").write_bytes((out / "log.jsonl").read_bytes())
    result = run("train.py", "--plot", str(copy), cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert png_size(copy / "curves.png") == png_size(out / "curves.png")
    result = run("train.py", "--plot", str(tmp_path / "missing"), cwd=work)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    log = tmp_path / "missing" / "log.jsonl"
    assert result.stderr.strip() == f"error: --plot: {log}: cannot read it (No such file or directory)", result.stderr
    (tmp_path / "log.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="no evaluations in it"):
        figures.curves_from_log(tmp_path)


def test_curves_writer_skips_redraws_too_close_together_but_not_the_last(tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in fake_log(2)))
    writer = figures.CurvesWriter(tmp_path, min_interval_s=3600)
    writer.update()
    first = (tmp_path / "curves.png").stat().st_mtime_ns
    os.utime(tmp_path / "curves.png", ns=(0, 0))
    writer.update()                                   # within the hour: skipped
    assert (tmp_path / "curves.png").stat().st_mtime_ns == 0
    writer.update(final=True)                         # the run's last evaluation is always drawn
    assert (tmp_path / "curves.png").stat().st_mtime_ns >= first


def test_curves_writer_never_stops_training(tmp_path, capsys):
    """A log that cannot be drawn gives one warning, once, and no exception."""
    writer = figures.CurvesWriter(tmp_path / "nowhere", min_interval_s=0)
    writer.update()
    writer.update()
    assert capsys.readouterr().out.count("warning: cannot draw") == 1


def test_spectrogram_size_and_a_file_name_with_dollars(tmp_path):
    """640 x 300 pixels; a title with '$' signs (a file name) is text, not a formula that fails to parse."""
    sr = 16_000
    audio = np.sin(2 * np.pi * 220 * np.arange(sr) / sr) * np.exp(-np.arange(sr) / sr)
    path = figures.spectrogram(audio, sr, tmp_path / "s.png", "cost $5 & <b> $x^$ ü.wav",
                               {"asked": 220.0, "measured": float("nan")})
    assert png_size(path) == (640, 300)
