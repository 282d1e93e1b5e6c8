"""Shared fixtures: a small synthetic note folder, an untrained codec fitted to it, and one fast training run (each
built once per session)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import files  # noqa: E402
import prepare  # noqa: E402

REAL_GUITAR = ROOT.parent / "shared" / "data" / "real-guitar"
needs_real_guitar = pytest.mark.skipif(not REAL_GUITAR.is_dir(),
                                       reason=f"real guitar notes not found at {REAL_GUITAR}")


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> Path:
    return prepare.make_synthetic(tmp_path_factory.mktemp("synthetic") / "notes", num_notes=24, seed=1, seconds=1.0)


@pytest.fixture(scope="session")
def fitted_codec(synthetic_folder) -> data.Codec:
    """An untrained EnCodec whose codebooks were fitted on 1 s of 24 synthetic notes (1,800 latents)."""
    files = data.find_audio(synthetic_folder)
    audio = torch.from_numpy(np.stack([data.read_audio(f, 24_000) for f in files]))
    codec = data.Codec.untrained(1.5, seed=0)
    codec.fit(audio, iters=5)
    return codec


# ----------------------------------------------------------------------------------------------------
# train.py / sample.py as a user runs them: offline, synthetic notes, untrained codec, a tiny model

TINY = ["--data", "synthetic", "--codec", "untrained", "--synthetic-notes", "48", "--seconds", "0.4",
        "--dim", "64", "--depth", "2", "--heads", "2", "--dim-head", "32", "--batch-size", "16",
        "--lr", "3e-3", "--warmup-iters", "5", "--lr-decay-iters", "60", "--eval-interval", "20", "--device", "cpu"]


def run(script: str, *args: str, cwd, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """One of the programs run as a user runs it, in its own Python process: its exit status and output."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def read_log(out_dir) -> list[dict]:
    return files.read_log(out_dir / "log.jsonl")


def assert_one_line(message, *facts: str) -> None:
    """An error message as a user must get it: one line, no traceback, carrying each of the facts (the flag, the file,
    the step...), whatever its other words."""
    message = str(message)
    assert "\n" not in message.strip() and "Traceback" not in message, message
    missing = [fact for fact in facts if fact not in message]
    assert not missing, f"{message!r} does not say {missing}"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One 40-step training run (conditional, the default) shared by the tests: (work folder, out folder, completed process)."""
    work = tmp_path_factory.mktemp("e2e")
    result = run("train.py", *TINY, "--max-iters", "40", "--out-dir", "out", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    return work, work / "out", result


# ----------------------------------------------------------------------------------------------------
# A fast training run, shared by the distributed and fault tests: 12 synthetic notes of 0.2 s (31 tokens), a
# 0.14M-parameter model, no dropout and float32 (so that runs on 1 and 2 processes can agree to 1e-4: bf16
# autocast, the default on CPUs with bf16, rounds partial sums differently), and an evaluation and a checkpoint
# after every step (so that a kill can land anywhere in the cycle).

FAST = ["--data", "synthetic", "--codec", "untrained", "--synthetic-notes", "12", "--seconds", "0.2",
        "--dim", "32", "--depth", "1", "--heads", "1", "--dim-head", "16", "--dropout", "0", "--batch-size", "8",
        "--lr", "3e-3", "--warmup-iters", "2", "--lr-decay-iters", "60", "--eval-interval", "1", "--device", "cpu",
        "--dtype", "float32"]
FAST_ITERS = 60  # a run stopped earlier and resumed has the same learning rates: the decay ends at 60 either way


def without_times(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "elapsed_s"} for entry in log]


@pytest.fixture(scope="session")
def fast_data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fast-data")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, fast_data_dir) -> Path:
    """FAST_ITERS steps in one uninterrupted process; returns its out folder."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run("train.py", *FAST, "--data-dir", str(fast_data_dir), "--max-iters", str(FAST_ITERS),
                        "--out-dir", str(out), cwd=out.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return out
