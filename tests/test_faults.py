"""Crash safety: SIGKILL at random moments, exact resume, encoding killed half-way, and damaged checkpoints."""
import ast
import io
import os
import random
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

import checkpoint
import data
import sample
import train
from conftest import FAST, FAST_ITERS, ROOT, assert_one_line, read_log, run, without_times
from test_data import CountingCodec

KILLS = 3
SEED = int(os.environ.get("CODECGPT_KILL_SEED", time.time_ns() % 10_000))  # the kill moments: printed, to replay


@pytest.fixture(autouse=True)
def say_the_seed():
    """Printed first by every test here, so that pytest shows it in any failure's captured output."""
    print(f"kill moments drawn with seed {SEED}; replay them: CODECGPT_KILL_SEED={SEED} python -m pytest "
          "tests/test_faults.py")


def last_logged_iter(log) -> int:
    """The iteration of the last complete line of log.jsonl, -1 if none."""
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        if line.endswith("}"):
            return int(line.split('"iter": ')[1].split(",")[0])
    return -1


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_exactly(tmp_path, fast_data_dir, reference_run):
    """Training killed with SIGKILL KILLS times, each time a random number of steps (1-6) plus a random fraction of
    a step after it got going (so in a step, an evaluation or a checkpoint write): ckpt.pt and best.pt always load
    with weights_only=True, every restart resumes from the iteration the checkpoint holds, and the last one reaches
    FAST_ITERS with the same weights and log as an uninterrupted run."""
    rng = random.Random(SEED)
    out = tmp_path / "out"
    flags = [*FAST, "--data-dir", str(fast_data_dir), "--max-iters", str(FAST_ITERS), "--out-dir", str(out)]
    deadline = time.monotonic() + 240
    at_kill = []  # checkpoint iteration after each kill
    while len(at_kill) < KILLS:
        start = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] if at_kill else 0
        steps = rng.randint(1, 6)
        with open(tmp_path / "stdout", "w") as stdout:
            resume = ["--resume"] if at_kill else []
            proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags, *resume], cwd=tmp_path,
                                    stdout=stdout, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            # "training notes" is printed once the log has been cut back to the checkpoint, just before training
            while (("training notes" not in (tmp_path / "stdout").read_text()
                    or last_logged_iter(out / "log.jsonl") < start + steps) and proc.poll() is None):
                assert time.monotonic() < deadline, "training made no progress"
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.06))  # about one step, evaluation and two checkpoint writes
            proc.kill()
            assert proc.wait() == -9, (tmp_path / "stdout").read_text()[-2000:]  # killed, not finished or failed
        if at_kill:
            assert f"resuming from {out / 'ckpt.pt'} at iteration {at_kill[-1]}" in (tmp_path / "stdout").read_text()
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        torch.load(out / "best.pt", weights_only=True)
        assert start <= ckpt["iter_num"] < FAST_ITERS
        at_kill.append(ckpt["iter_num"])
    print(f"\nseed {SEED}: killed {KILLS} times, at checkpoint iterations {at_kill}")

    result = run("train.py", *flags, "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    final = torch.load(out / "ckpt.pt", weights_only=True)
    reference = torch.load(reference_run / "ckpt.pt", weights_only=True)
    assert final["iter_num"] == FAST_ITERS
    for key in reference["model"]:
        assert torch.equal(final["model"][key], reference["model"][key]), key
    # the log lines written after the last checkpoint of a killed run were dropped on resume, none is missing
    assert without_times(read_log(out)) == without_times(read_log(reference_run))


@pytest.mark.slow
def test_encoding_killed_half_way_leaves_only_a_cache_to_trust(tmp_path, synthetic_folder, fitted_codec):
    """encode_files saving after every batch is SIGKILLed at a random moment after its first save: the cache on disk
    loads whole, holds some of the notes, and the next run encodes exactly the others and gets the same codes as an
    encoding that was never interrupted."""
    files = data.find_audio(synthetic_folder)
    torch.save(fitted_codec.codebooks(), tmp_path / "codebooks.pt")
    cache = tmp_path / "cache" / "train.npz"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch, data; "
              f"torch.set_num_threads({torch.get_num_threads()}); "  # the same arithmetic as this process
              f"books = torch.load({str(tmp_path / 'codebooks.pt')!r}, weights_only=True); "
              "codec = data.Codec.untrained(1.5, 0, books); "
              f"data.encode_files(data.find_audio({str(synthetic_folder)!r}), codec, 40, data.Path({str(cache)!r}), "
              f"batch_size=1, save_every=0)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not cache.exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(random.Random(SEED).uniform(0, 0.3))
    proc.kill()
    assert proc.wait() == -9, proc.stderr.read()[-2000:]

    with np.load(cache, allow_pickle=False) as z:  # a whole file, not half of one
        done = len(z["codes"])
    assert 0 < done < len(files)
    codec = CountingCodec(fitted_codec)
    resumed = data.encode_files(files, codec, 40, cache)
    assert codec.encoded == len(files) - done and resumed.files == files
    # the notes the killed run saved are those a clean run gets (in batches of 1 like it: the same arithmetic)
    clean = data.encode_files(files[:done], fitted_codec, 40, None, batch_size=1)
    assert np.array_equal(resumed.codes[:done], clean.codes)
    print(f"\nencoding killed after {done} of {len(files)} notes; the next run encoded the other {codec.encoded}")


class Payload:
    """Pickles as a call to os.system: loading it with weights_only=False would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, reference_run):
    """Folders holding a damaged ckpt.pt each, by what is wrong with it."""
    root = tmp_path_factory.mktemp("damaged")
    good = (reference_run / "ckpt.pt").read_bytes()
    base = checkpoint.load_checkpoint(reference_run / "ckpt.pt")
    cases = {"empty": b"", "truncated": good[:len(good) // 2], "flipped": flip_a_weight_byte(good)}
    for name, content in cases.items():
        (root / name).mkdir()
        (root / name / "ckpt.pt").write_bytes(content)
    for name, obj in (("pickled", {**base, "extra": Payload(root / "marker")}),
                      ("not-a-dict", [1, 2, 3])):
        (root / name).mkdir()
        torch.save(obj, root / name / "ckpt.pt")
    # written as train.py writes (with a digest of what they hold), but not for the model this run builds
    for name, obj in (("other-model", {**base, "config": {**base["config"], "dim": 48}}),
                      ("other-run", {**base, "args": {**base["args"], "dim": 48}})):
        (root / name).mkdir()
        checkpoint.save_checkpoint(obj, root / name / "ckpt.pt")
    return root


def flip_a_weight_byte(zip_bytes: bytes) -> bytes:
    """The checkpoint with one bit changed in the middle of its largest tensor's bytes (the zip entries that
    torch.save writes are stored uncompressed, so the tensor data sits in the file as it is)."""
    archive = zipfile.ZipFile(io.BytesIO(zip_bytes))
    entry = max(archive.infolist(), key=lambda e: e.file_size)
    name_len, extra_len = struct.unpack("<HH", zip_bytes[entry.header_offset + 26:entry.header_offset + 30])
    middle = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
    return zip_bytes[:middle] + bytes([zip_bytes[middle] ^ 0x10]) + zip_bytes[middle + 1:]


EXPECTED = {"empty": "empty file", "truncated": "truncated", "not-a-dict": "not a checkpoint",
            "pickled": "refused: it holds a pickled object (posix.system)",
            "flipped": "damaged: its contents no longer match the SHA-256 digest saved with them"}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_damaged_checkpoint_is_one_line_naming_file_and_problem(damaged, case):
    """sample.py --ckpt and train.py --resume refuse an empty, truncated, pickled-object or non-dict checkpoint with
    one line that names the file and what is wrong, and never run what it holds."""
    path = damaged / case / "ckpt.pt"
    for main, argv in ((sample.main, ["--ckpt", str(path), "--device", "cpu"]),
                       (train.main, ["--out-dir", str(path.parent), "--resume", "--device", "cpu"])):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert_one_line(exit.value.code, f"error: {path}: ", EXPECTED[case])
    assert not (damaged / "marker").exists()


@pytest.mark.slow
def test_checkpoint_for_another_model_is_one_line(damaged, fast_data_dir):
    """A checkpoint whose config does not fit its weights (sample.py), or whose flags build another model than its
    config (train.py --resume), is refused in one line naming the file and the mismatch."""
    path = damaged / "other-model" / "ckpt.pt"
    with pytest.raises(SystemExit) as exit:
        sample.main(["--ckpt", str(path), "--device", "cpu"])
    assert_one_line(exit.value.code, f"error: {path}: ", "does not match its config")
    path = damaged / "other-run" / "ckpt.pt"
    with pytest.raises(SystemExit) as exit:
        train.main(["--out-dir", str(path.parent), "--resume", "--device", "cpu"])
    assert_one_line(exit.value.code, f"error: {path}: ", "another model", "dim 32 != 48")


@pytest.mark.slow
def test_a_flipped_byte_loads_silently_in_torch_but_not_here(damaged, reference_run):
    """torch checks no checksum of tensor data: the file with one bit changed in a weight loads without complaint,
    with a different weight. load_checkpoint's digest catches it; a checkpoint without a digest (written before
    digests were saved) still loads."""
    path = damaged / "flipped" / "ckpt.pt"
    flipped = torch.load(path, weights_only=True)
    good = torch.load(reference_run / "ckpt.pt", weights_only=True)
    contents = lambda ckpt: checkpoint.digest({k: v for k, v in ckpt.items() if k != "digest"})  # noqa: E731
    assert flipped["digest"] == good["digest"] and contents(flipped) != contents(good)
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.load_checkpoint(path)
    old_style = damaged / "old-style.pt"
    torch.save({k: v for k, v in good.items() if k != "digest"}, old_style)
    assert checkpoint.load_checkpoint(old_style)["iter_num"] == good["iter_num"]


@pytest.mark.slow
def test_pickled_checkpoint_as_the_user_sees_it(damaged):
    """Run as a program, the refusal is exactly one line on stderr, with no traceback, and the payload never runs."""
    path = damaged / "pickled" / "ckpt.pt"
    result = run("sample.py", "--ckpt", str(path), "--device", "cpu", cwd=damaged)
    assert result.returncode == 1
    assert_one_line(result.stderr, f"error: {path}: ", "pickled object (posix.system)")
    assert not (damaged / "marker").exists()


def test_every_torch_load_is_weights_only():
    """No torch.load in the project's programs runs without weights_only=True."""
    calls = []
    for path in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls.append((path.name, {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")))
    assert len(calls) >= 3 and all(flag == "True" for _, flag in calls), calls
