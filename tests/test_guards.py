"""The faults a long run meets (long_run.py, files.py): a diverging run, a signal asking it to stop, a full disk."""
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import files
import long_run
import sample
import train
from conftest import FAST, ROOT, assert_one_line, read_log, run, without_times
from test_data import CountingCodec

# The fast run of conftest with an evaluation every 25 steps, so that a signal lands between two of them
EVERY_25 = [*FAST[:FAST.index("--eval-interval")], *FAST[FAST.index("--eval-interval") + 2:], "--eval-interval", "25"]
ITERS = 60


# ----------------------------------------------------------------------------------------------------
# Non-finite steps

def tiny_optimizer():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    return net, torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)


def test_non_finite_step_changes_no_weight_and_is_counted():
    """A step with a NaN loss leaves the weights, AdamW's moments and its step count exactly as they were (fused
    AdamW skips it on the device, CPU included), is counted, and the next finite step updates again."""
    net, opt = tiny_optimizer()
    guard = long_run.NonFiniteSteps(opt, "cpu", advice="try less")
    x = torch.randn(8, 4)
    for scale in (1.0, math.nan, math.inf, 1.0):
        before = {k: v.clone() for k, v in net.state_dict().items()}
        moments = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
        loss = net(x).pow(2).mean() * scale
        loss.backward()
        counts = guard.check(loss, torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0), step=0)
        opt.step()
        opt.zero_grad()
        changed = any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
        assert changed == math.isfinite(scale) and counts.item() == float(math.isfinite(scale))
        if not math.isfinite(scale):
            assert all(torch.equal(m[k], s[k]) for m, s in zip(moments, opt.state.values()) for k in m)
    assert guard.take_skipped() == 2 and guard.take_skipped() == 0
    assert [int(s["step"]) for s in opt.state.values()] == [2, 2]  # only the finite steps counted
    guard.raise_if_diverged("nothing saved")  # two in a row is not a divergence


def test_max_in_a_row_non_finite_steps_raise_one_line():
    """MAX_IN_A_ROW skipped steps in a row raise Diverged naming the steps, the checkpoint to go back to and what to
    try; fewer in a row, with a finite step between them, do not."""
    net, opt = tiny_optimizer()
    guard = long_run.NonFiniteSteps(opt, "cpu", advice="try a lower --lr")
    nan, one = torch.tensor(math.nan), torch.tensor(1.0)
    for step in range(10, 14):
        guard.check(nan, one, step)
    guard.check(one, one, 14)
    guard.raise_if_diverged("-")
    for step in range(15, 15 + long_run.MAX_IN_A_ROW + 2):
        guard.check(one, nan, step)
    with pytest.raises(long_run.Diverged) as e:
        guard.raise_if_diverged("the last checkpoint with finite weights is out/ckpt.pt (iteration 10)")
    assert_one_line(e.value, "steps 15-19", "out/ckpt.pt (iteration 10)", "try a lower --lr")
    with pytest.raises(ValueError, match="fused=True"):
        long_run.NonFiniteSteps(torch.optim.AdamW(net.parameters()), "cpu", advice="")


def test_diverging_run_stops_with_one_line_and_keeps_finite_checkpoints(tmp_path, fast_data_dir, capsys):
    """The issue's run (--lr 1e5) stops, with one line naming the step, the last checkpoint with finite weights and
    what to try, and exit status 1 (a message to sys.exit); ckpt.pt and best.pt hold finite weights (best.pt those
    of step 0: nothing after it was better)."""
    out = tmp_path / "out"
    flags = [*FAST[:FAST.index("--eval-interval")], "--eval-interval", "5", "--lr", "1e5"]
    with pytest.raises(SystemExit) as stop:
        train.main([*flags, "--data-dir", str(fast_data_dir), "--max-iters", "30", "--out-dir", str(out)])
    # which guard sees it first depends on the CPU's bf16 arithmetic: the validation loss at step 5 is NaN, or (seen
    # on a CPU with AMX bf16) steps 1-5 are all skipped, so the weights stay finite and step 5 is saved first
    saved = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    message = str(stop.value.code)
    assert_one_line(message, "error: diverged", f"{out / 'ckpt.pt'} (iteration {saved})", "--lr", "100000",
                    "--dtype float32")
    assert re.search(r"validation loss at step 5 is nan|steps 1-5 ", message), message
    assert "done:" not in capsys.readouterr().out
    for name in ("ckpt.pt", "best.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert all(v.isfinite().all() for v in ckpt["model"].values())
        assert ckpt["iter_num"] == (saved if name == "ckpt.pt" else 0)
    assert saved in (0, 5)


def nan_loss_at(monkeypatch, bad_steps):
    """Make train.py's training loss NaN at the given steps (counted in calls with gradients: one per step here)."""
    calls = []
    real = train.next_token_loss

    def loss(model, tokens, tokenizer):
        value, logits = real(model, tokens, tokenizer)
        if torch.is_grad_enabled():
            calls.append(len(calls))
            if calls[-1] in bad_steps:
                value = value * math.nan
        return value, logits
    monkeypatch.setattr(train, "next_token_loss", loss)


def test_non_finite_steps_are_skipped_logged_and_then_stop_the_run(tmp_path, fast_data_dir, monkeypatch, capsys):
    """Training with NaN losses at two steps goes on, logs them as skipped_steps, and keeps the train loss finite;
    NaN losses from step 3 on stop it at the next host read (step 10) with one line naming steps 3-7."""
    flags = [*EVERY_25, "--data-dir", str(fast_data_dir), "--max-iters", "12", "--eval-interval", "6"]
    nan_loss_at(monkeypatch, {3, 4})
    train.main([*flags, "--out-dir", str(tmp_path / "a")])
    log = read_log(tmp_path / "a")
    assert [(e["iter"], e["skipped_steps"]) for e in log] == [(0, 0), (6, 2), (12, 0)]
    assert all(math.isfinite(e["train_loss"]) for e in log[1:])
    assert "; 2 non-finite steps skipped" in capsys.readouterr().out

    nan_loss_at(monkeypatch, set(range(3, 100)))
    with pytest.raises(SystemExit) as stop:
        train.main([*flags, "--out-dir", str(tmp_path / "b")])
    assert_one_line(stop.value.code, "error: diverged", "steps 3-7", f"{tmp_path / 'b' / 'ckpt.pt'} (iteration 6)",
                    "--lr", "0.003", "--dtype float32")


# ----------------------------------------------------------------------------------------------------
# Signals

def test_stop_signals_ask_to_stop_and_a_second_ctrl_c_exits_at_once():
    """Inside StopSignals, SIGTERM (or SIGUSR1, or SIGINT) only sets stop_requested, with the conventional exit
    status; a second SIGINT raises KeyboardInterrupt; the previous handlers are back afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    with long_run.StopSignals() as stop:
        assert not stop.stop_requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.stop_requested and stop.name == "SIGTERM" and stop.exit_status == 143
        os.kill(os.getpid(), signal.SIGUSR1)  # a later signal other than Ctrl-C changes nothing
        time.sleep(0.01)
        assert stop.exit_status == 143
    assert signal.getsignal(signal.SIGTERM) is before
    with long_run.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.exit_status == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert long_run.agree(True, "cpu") and not long_run.agree(False, "cpu")  # one process: its own flag


def train_until(args, cwd, seen: str, send: int, stdout_path):
    """Run train.py with args, send the signal `send` once `seen` is on its stdout; returns the finished process."""
    with open(stdout_path, "w") as stdout:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, stdout=stdout,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while seen not in stdout_path.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(send)
        proc.wait(timeout=120)
    return proc


@pytest.fixture(scope="module")
def every_25_run(tmp_path_factory, fast_data_dir):
    """ITERS steps, evaluated every 25, in one uninterrupted process; returns its out folder."""
    out = tmp_path_factory.mktemp("every-25") / "out"
    result = run("train.py", *EVERY_25, "--data-dir", str(fast_data_dir), "--max-iters", str(ITERS),
                 "--out-dir", str(out), cwd=out.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_sigterm_between_evaluations_saves_that_step_and_resumes_exactly(tmp_path, fast_data_dir, every_25_run):
    """SIGTERM after the evaluation at 25: the run finishes its step, saves ckpt.pt at that step (between
    evaluations: its metrics are those of step 25 and the log gets no line for it), prints how to continue and
    exits 143; --resume then ends with the same weights and the same log as the uninterrupted run."""
    out = tmp_path / "out"
    flags = [*EVERY_25, "--data-dir", str(fast_data_dir), "--max-iters", str(ITERS), "--out-dir", str(out)]
    proc = train_until(flags, tmp_path, "iter 25:", signal.SIGTERM, tmp_path / "stdout")
    assert proc.returncode == 143, proc.stderr.read()[-2000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    stopped = ckpt["iter_num"]
    assert 25 < stopped < 50 and ckpt["metrics"]["iter"] == 25 and "optimizer" in ckpt and "rng" in ckpt
    assert ckpt["interval"]["steps"] == stopped - 25
    said = next(line for line in (tmp_path / "stdout").read_text().splitlines() if "stopped by" in line)
    assert_one_line(said, "SIGTERM", f"step {stopped}", str(out / "ckpt.pt"), "--resume")
    assert [e["iter"] for e in read_log(out)] == [0, 25]
    assert not list(out.glob("*.tmp*"))

    result = run("train.py", *flags, "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {out / 'ckpt.pt'} at iteration {stopped}" in result.stdout
    final, reference = (torch.load(o / "ckpt.pt", weights_only=True) for o in (out, every_25_run))
    assert final["iter_num"] == ITERS
    for key in reference["model"]:
        assert torch.equal(final["model"][key], reference["model"][key]), key
    # the evaluation at 50 averages the train loss over steps 25-49, before and after the stop, as in one run
    assert without_times(read_log(out)) == without_times(read_log(every_25_run))


def rank_pids(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes a torchrun started (its children's RANK)."""
    pids = {}
    for task in os.listdir(f"/proc/{torchrun_pid}/task"):
        for child in open(f"/proc/{torchrun_pid}/task/{task}/children").read().split():
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{child}/environ").read().split("\0") if "=" in kv)
            if "RANK" in env:
                pids[int(env["RANK"])] = int(child)
    return pids


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path, fast_data_dir):
    """SIGUSR1 to rank 1 only: the ranks agree (an all-reduced flag), both stop after the same step, rank 0 alone
    writes ckpt.pt at it, holding both ranks' random states, and both exit 138 (128 + SIGUSR1)."""
    out = tmp_path / "out"
    stdout_path = tmp_path / "stdout"
    flags = [*EVERY_25, "--data-dir", str(fast_data_dir), "--max-iters", "400",
             "--out-dir", str(out)]
    with open(stdout_path, "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(ROOT / "train.py"), *flags], cwd=tmp_path, stdout=stdout,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 180
        while "iter 25:" not in stdout_path.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(rank_pids(proc.pid)[1], signal.SIGUSR1)
        proc.wait(timeout=120)
    text = stdout_path.read_text()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert 25 < ckpt["iter_num"] < 400, text[-3000:]
    assert len(ckpt["rng"]["ranks"]) == 2 and ckpt["interval"]["steps"] == ckpt["iter_num"] - 25
    assert text.count("stopped by") == 1  # rank 0 alone reports it
    said = next(line for line in text.splitlines() if "stopped by" in line)
    assert_one_line(said, "SIGUSR1", f"step {ckpt['iter_num']}", str(out / "ckpt.pt"))
    assert "exitcode  : 138" in text  # torchrun's report of its workers' exit status


# ----------------------------------------------------------------------------------------------------
# A full disk

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_saving_a_checkpoint(tmp_path, fast_data_dir, monkeypatch):
    """torch.save failing half-way with ENOSPC at the checkpoint of step 2: train.py stops with one line naming the
    file and the free space; ckpt.pt still holds step 1, whole, and no temporary file is left."""
    out = tmp_path / "out"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj.get("iter_num") == 2 and "ckpt.pt" in f.name:
            f.write(b"half a checkpoint")
            no_space()
        real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as stop:
        train.main([*FAST, "--data-dir", str(fast_data_dir), "--max-iters", "4", "--out-dir", str(out)])
    assert_one_line(stop.value.code, "error:", str(out / "ckpt.pt"), "No space left on device", "MiB free")
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 1
    assert [e["iter"] for e in read_log(out)] == [0, 1, 2]  # --resume cuts it back to 1
    assert not list(out.glob("*.tmp*"))


def test_full_disk_while_saving_the_token_cache_keeps_what_it_finished(tmp_path, synthetic_folder, fitted_codec,
                                                                       monkeypatch):
    """The cache's third save fails with ENOSPC: WriteError names the cache; the file on disk is its second save
    (2 notes, whole); the next run encodes only the others."""
    files_ = data.find_audio(synthetic_folder)[:5]
    cache = tmp_path / "cache" / "train.npz"
    real_savez, saves = np.savez, []

    def savez(f, **arrays):
        saves.append(len(arrays["codes"]))
        if len(saves) == 3:
            f.write(b"PK half")
            no_space()
        real_savez(f, **arrays)
    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(files.WriteError) as e:
        data.encode_files(files_, fitted_codec, 20, cache, batch_size=1, save_every=0)
    monkeypatch.setattr(np, "savez", real_savez)
    assert_one_line(e.value, str(cache), "No space left on device")
    with np.load(cache, allow_pickle=False) as z:
        assert len(z["codes"]) == 2
    assert sorted(p.name for p in cache.parent.iterdir()) == ["train.npz"]
    codec = CountingCodec(fitted_codec)
    assert data.encode_files(files_, codec, 20, cache).files == files_ and codec.encoded == 3


def test_full_disk_while_appending_to_the_log_cuts_the_half_line_off(tmp_path, monkeypatch):
    """os.write managing half a log line, then ENOSPC: WriteError, and the log is its earlier lines, byte for byte,
    so the next line starts on a line of its own."""
    log = tmp_path / "log.jsonl"
    files.append_log(log, {"iter": 0, "val_loss": 7.0})
    before = log.read_bytes()
    real_write = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") == str(log):
            if len(data) > 4:
                return real_write(fd, bytes(data[:len(data) // 2]))
            no_space()
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(files.WriteError) as e:
        files.append_log(log, {"iter": 1, "val_loss": 6.0})
    monkeypatch.setattr(os, "write", real_write)
    assert_one_line(e.value, str(log), "No space left on device")
    assert log.read_bytes() == before
    files.append_log(log, {"iter": 2, "val_loss": 5.0})
    assert [e["iter"] for e in files.read_log(log)] == [0, 2]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and a kernel that lets us mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                                 text=True, timeout=30)
    except OSError as e:  # no mount program
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if mounted.returncode:  # not root, or a container that may not mount
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or 'mount failed'}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_real_full_disk(tiny_disk):
    """On a 2 MiB tmpfs: atomic_write of a file larger than the disk fails with one line, leaves the earlier version
    and no temporary file; append_log on the full disk leaves the log as it was."""
    path = tiny_disk / "ckpt.pt"
    files.atomic_write(path, lambda f: f.write(b"old" * 100_000))
    log = tiny_disk / "log.jsonl"
    files.append_log(log, {"iter": 0})
    with pytest.raises(files.WriteError) as e:
        files.atomic_write(path, lambda f: f.write(os.urandom(3 * 2**20)))
    assert_one_line(e.value, str(path), "No space left on device")
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" * 100_000
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["ckpt.pt", "log.jsonl"]
    filler = tiny_disk / "filler"
    with pytest.raises(OSError):
        with open(filler, "wb") as f:  # fill the disk to the last byte
            while True:
                f.write(b"x" * 4096)
                f.flush()
    with pytest.raises(files.WriteError) as e:
        files.append_log(log, {"iter": 1, "val_loss": 1.0, "pad": "x" * 8192})
    assert_one_line(e.value, str(log), "0.0 MiB free")
    assert json.loads(log.read_text()) == {"iter": 0}


# ----------------------------------------------------------------------------------------------------
# sample.py: a full disk, and Ctrl-C

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, fast_data_dir):
    """A checkpoint of the fast model after 2 steps (trained in this process: sampling needs no good model)."""
    out = tmp_path_factory.mktemp("tiny-ckpt")
    train.main([*FAST, "--data-dir", str(fast_data_dir), "--max-iters", "2", "--out-dir", str(out)])
    return out / "ckpt.pt"


def sample_argv(ckpt, out, *more):
    return ["--ckpt", str(ckpt), "--out-dir", str(out), "--device", "cpu", "--batch-size", "1", *more]


class HalfThenFull:
    """A file open for writing that takes half of what it is given, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(bytes(data)[:len(data) // 2])
        no_space()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_while_writing_a_wav_keeps_the_old_one(tmp_path, tiny_checkpoint, monkeypatch):
    """sample.py writing its second WAV fills the disk half-way: one line naming the file; the WAV of an earlier run
    under that name is still there, whole, and no temporary file is left."""
    out = tmp_path / "samples"
    sample.main(sample_argv(tiny_checkpoint, out, "--num-samples", "2"))
    old = (out / "sample_1.wav").read_bytes()

    def open_(path, mode="r", *args, **kwargs):  # files.atomic_write's open: the disk fills on sample_1.wav
        f = open(path, mode, *args, **kwargs)
        return HalfThenFull(f) if "sample_1.wav" in str(path) else f
    monkeypatch.setattr(files, "open", open_, raising=False)
    with pytest.raises(SystemExit) as stop:
        sample.main(sample_argv(tiny_checkpoint, out, "--num-samples", "2", "--seed", "1"))
    assert_one_line(stop.value.code, "error:", str(out / "sample_1.wav"), "No space left on device")
    assert (out / "sample_1.wav").read_bytes() == old
    assert not list(out.glob("*.tmp*"))


def test_sample_stopped_by_ctrl_c_keeps_its_finished_notes_and_their_page(tmp_path, tiny_checkpoint, monkeypatch,
                                                                           capsys):
    """Ctrl-C while the third of 4 notes is generated: the 2 finished notes stay, the page lists exactly them, and
    sample.py exits 130 (128 + SIGINT)."""
    out = tmp_path / "samples"
    real_generate, calls = sample.GPT.generate, []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(self, *args, **kwargs)
    monkeypatch.setattr(sample.GPT, "generate", generate)
    with pytest.raises(SystemExit) as stop:
        sample.main(sample_argv(tiny_checkpoint, out, "--num-samples", "4"))
    assert stop.value.code == 130
    assert sorted(p.name for p in out.glob("*.wav")) == ["sample_0.wav", "sample_1.wav"]
    page = (out / "index.html").read_text()
    assert "sample_0.wav" in page and "sample_1.wav" in page and "sample_2.wav" not in page
    assert "interrupted: kept the 2 of 4 notes finished" in capsys.readouterr().out


def test_training_on_a_real_full_disk_stops_with_one_line(tiny_disk, fast_data_dir):
    """train.py writing into a 2 MiB tmpfs: best.pt (1.7 MB) fits, ckpt.pt (with AdamW's moments, 3 MB) does not;
    the run stops with one line naming ckpt.pt and the space left, and leaves no temporary file."""
    with pytest.raises(SystemExit) as stop:
        train.main([*FAST, "--data-dir", str(fast_data_dir), "--max-iters", "2", "--out-dir", str(tiny_disk)])
    assert_one_line(stop.value.code, "error:", str(tiny_disk / "ckpt.pt"), "No space left on device", "MiB free")
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["best.pt", "log.jsonl"]
