"""A messy folder: every file is used or skipped with its reason, the good ones are all used, and bad flags are
refused by name."""
import os
import struct
import tempfile

import numpy as np
import pytest
import soundfile as sf

import data
import sample
import train
from conftest import assert_one_line, run

GOOD = ["good_1.wav", "good_2.flac", "ñote with spaces, é 音.wav", "eight_channels.wav", "one_sample.wav",
        "rate_192k.wav", "thirty_minutes.wav", "truncated.wav", "truncated.mp3", "folder.wav/inside.wav"]
# the bad files, and what the reason each is skipped with must say
BAD = {"empty.wav": "cannot read audio", "text.flac": "cannot read audio", "cut_short.mp3": "damaged",
       "nan.wav": "NaN or infinite", "inf.wav": "NaN or infinite", "loop_a.wav": "symbolic links",
       "loop_b.wav": "symbolic links"}
THIRTY_MINUTES = 30 * 60 * 48_000


def permissions_apply() -> bool:
    """False for root (or a process with CAP_DAC_OVERRIDE), which reads any file whatever its permissions."""
    with tempfile.TemporaryDirectory() as folder:
        probe = os.path.join(folder, "probe")
        open(probe, "w").close()
        os.chmod(probe, 0)
        try:
            open(probe).close()
        except PermissionError:
            return True
        return False


PERMISSIONS_APPLY = permissions_apply()
if PERMISSIONS_APPLY:  # (as root this case is left out; test_unreadable_file_is_skipped_with_its_reason says so)
    BAD["locked.wav"] = "Permission denied"


def tone(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def write_thirty_minutes(path) -> None:
    """A 30-minute 48 kHz 16-bit WAV (173 MB as far as any reader can tell) whose first second is a tone: the header
    says so, and the rest of the file is a hole that the file system fills with zeros (silence) without writing."""
    n = THIRTY_MINUTES * 2
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 48_000, 96_000, 2, 16)
    with open(path, "wb") as f:
        f.write(struct.pack("<4sI4s", b"RIFF", 4 + len(fmt) + 8 + n, b"WAVE") + fmt)
        f.write(struct.pack("<4sI", b"data", n))
        f.write((tone(1.0, 48_000) * 32767).astype("<i2").tobytes())
        f.truncate(f.tell() - 48_000 * 2 + n)


def make_hostile_folder(root):
    root.mkdir()
    sf.write(root / "good_1.wav", tone(1.0, 16_000), 16_000)
    sf.write(root / "good_2.flac", tone(1.0, 44_100, 330), 44_100)
    sf.write(root / "ñote with spaces, é 音.wav", tone(1.0, 22_050, 220), 22_050)
    sf.write(root / "eight_channels.wav", np.repeat(tone(1.0, 48_000)[:, None], 8, axis=1), 48_000)
    sf.write(root / "one_sample.wav", np.array([0.25], np.float32), 44_100)
    sf.write(root / "rate_192k.wav", tone(0.5, 192_000), 192_000)
    write_thirty_minutes(root / "thirty_minutes.wav")
    sf.write(root / "whole.wav", tone(1.0, 16_000), 16_000)
    whole = (root / "whole.wav").read_bytes()
    (root / "truncated.wav").write_bytes(whole[:len(whole) // 4])   # 0.25 s; the header promises 1 s
    (root / "whole.wav").unlink()
    sf.write(root / "whole.mp3", tone(1.0, 48_000), 48_000, format="MP3")
    whole = (root / "whole.mp3").read_bytes()
    (root / "truncated.mp3").write_bytes(whole[:len(whole) * 2 // 5])
    (root / "cut_short.mp3").write_bytes(whole[:100])
    (root / "whole.mp3").unlink()
    (root / "folder.wav").mkdir()                                   # a folder named like a file: walked into
    sf.write(root / "folder.wav" / "inside.wav", tone(1.0, 16_000), 16_000)
    (root / "empty.wav").write_bytes(b"")
    (root / "text.flac").write_text("this is not audio\n")
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        x = tone(1.0, 16_000)
        x[100] = value
        sf.write(root / name, x, 16_000, subtype="FLOAT")
    os.symlink("loop_b.wav", root / "loop_a.wav")                   # links to each other
    os.symlink("loop_a.wav", root / "loop_b.wav")
    os.symlink(".", root / "loop")                                  # a folder that contains itself
    if PERMISSIONS_APPLY:
        sf.write(root / "locked.wav", tone(1.0, 16_000), 16_000)
        os.chmod(root / "locked.wav", 0)
    return root


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return make_hostile_folder(tmp_path_factory.mktemp("hostile") / "messy notes")


def test_each_file_is_used_or_skipped_with_its_reason(hostile, fitted_codec):
    """encode_files, as train.py calls it, uses exactly the good files and skips each bad one with its reason."""
    files = data.find_audio(hostile)
    encoded = data.encode_files(files, fitted_codec, 20)
    assert sorted(f.relative_to(hostile).as_posix() for f in encoded.files) == sorted(GOOD)
    skipped = {f.relative_to(hostile).as_posix(): reason for f, reason in encoded.skipped}
    assert skipped.keys() == BAD.keys() and all(BAD[name] in reason for name, reason in skipped.items()), skipped
    assert len(files) == len(GOOD) + len(BAD)  # nothing found twice through the looping link, nothing else


def test_good_oddities_read_correctly(hostile):
    """8 channels are mixed to mono, 192 kHz is resampled, 1 sample is padded with silence, and a truncated WAV or
    MP3 gives the samples it has."""
    read = {name: data.read_audio(hostile / name, 12_000) for name in GOOD}
    assert all(x.shape == (12_000,) and np.isfinite(x).all() for x in read.values())
    for name in ("eight_channels.wav", "rate_192k.wav", "thirty_minutes.wav", "good_1.wav"):
        assert np.abs(read[name][2000:]).max() == pytest.approx(0.5, abs=0.02), name
    assert not read["one_sample.wav"][100:].any()
    assert np.abs(read["truncated.wav"][:5000]).max() > 0.4 and not read["truncated.wav"][7000:].any()
    assert np.abs(read["truncated.mp3"][:5000]).max() > 0.4


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io to count bytes read")
def test_thirty_minute_file_reads_only_what_is_needed(hostile):
    """Reading 0.5 s of a 30-minute WAV reads well under 1 MB of its 173 MB."""
    def bytes_read() -> int:
        return int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["rchar"])
    path = hostile / "thirty_minutes.wav"
    assert sf.info(path).frames == THIRTY_MINUTES
    before = bytes_read()
    data.read_audio(path, 12_000)
    assert bytes_read() - before < 1_000_000


@pytest.mark.slow
def test_train_on_the_messy_folder(hostile, tmp_path):
    """train.py runs on the folder, exits 0, prints every skipped file with its reason, and trains on all the good
    ones."""
    result = run("train.py", "--data", str(hostile), "--codec", "untrained", "--data-dir", str(tmp_path),
                        "--seconds", "0.2", "--dim", "32", "--depth", "1", "--heads", "1", "--dim-head", "16",
                        "--batch-size", "4", "--max-iters", "2", "--eval-interval", "2", "--device", "cpu",
                        "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name, reason in BAD.items():
        said = [line for line in result.stdout.splitlines() if line.strip().startswith(f"{hostile / name}: ")]
        assert len(said) == 1 and reason in said[0], name
    line = next(line for line in result.stdout.splitlines() if "training notes" in line)
    train_notes, valid_notes = int(line.split()[0]), int(line.split(", ")[1].split()[0])
    assert train_notes + valid_notes == len(GOOD)
    # the one file the 5% split picks for validation is loop_a.wav, a bad one: a good training note stands in
    assert data.split_folder(hostile)["valid"] == [hostile / "loop_a.wav"]
    assert "valid: none of its 1 files could be used; validating on" in result.stdout and valid_notes == 1
    print(f"\n{len(GOOD) + len(BAD)} inputs: {len(GOOD)} used ({train_notes} training, {valid_notes} validation), "
          f"{len(BAD)} skipped:\n" + "\n".join(f"  {name}: {reason}" for name, reason in BAD.items()))


@pytest.mark.slow
def test_a_folder_of_only_bad_files_is_one_clear_error(tmp_path):
    """Only bad files: exit 1 and a single error line that says there is no readable audio, no traceback (libmpg123
    may print warnings of its own about the damaged MP3)."""
    folder = make_hostile_folder(tmp_path / "bad")
    for name in GOOD:
        os.unlink(folder / name)
    result = run("train.py", "--data", str(folder), "--codec", "untrained", "--data-dir", str(tmp_path / "d"),
                        "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if not line.startswith("[src/libmpg123")]
    assert len(errors) == 1, result.stderr
    assert_one_line(errors[0], "error:", f"--data {folder}", "no readable audio")


@pytest.mark.skipif(not PERMISSIONS_APPLY, reason="running as root, which reads files whatever their permissions")
def test_unreadable_file_is_skipped_with_its_reason(tmp_path, fitted_codec):
    """A file this user may not read is skipped as 'cannot open (Permission denied)'; the other file is used."""
    sf.write(tmp_path / "good.wav", tone(1.0, 16_000), 16_000)
    sf.write(tmp_path / "locked.wav", tone(1.0, 16_000), 16_000)
    os.chmod(tmp_path / "locked.wav", 0)
    encoded = data.encode_files(data.find_audio(tmp_path), fitted_codec, 20)
    assert [f.name for f in encoded.files] == ["good.wav"]
    assert [f.name for f, _ in encoded.skipped] == ["locked.wav"] and "Permission denied" in encoded.skipped[0][1]


@pytest.mark.parametrize("program,flag,value", [
    (train, "--device", "tpu"), (train, "--grad-accum", "0"), (train, "--lr", "nan"), (train, "--seconds", "inf"),
    (train, "--batch-size", "-4"), (train, "--dropout", "-0.1"),
    (sample, "--temperature", "-1"), (sample, "--temperature", "inf"), (sample, "--top-p", "0"),
    (sample, "--top-p", "1.5"), (sample, "--num-samples", "0"), (sample, "--device", "tpu")])
def test_bad_flag_values_are_refused_by_name(program, flag, value, capsys):
    """Out-of-range, nan and inf values and unknown devices stop argument parsing with a message naming the flag."""
    with pytest.raises(SystemExit) as exit:
        program.parse_args([flag, value])
    assert exit.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_batch_not_divisible_among_micro_steps_is_refused(tmp_path):
    """--batch-size must split evenly into --grad-accum micro-steps: one line naming both flags."""
    with pytest.raises(SystemExit) as exit:
        train.main(["--batch-size", "10", "--grad-accum", "4", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert_one_line(exit.value.code, "error:", "--batch-size 10", "--grad-accum 4")
