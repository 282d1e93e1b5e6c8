"""train.py under torchrun: two CPU processes (gloo) train like one process with the same global batch."""
import subprocess
import sys

import pytest
import torch

from conftest import FAST, FAST_ITERS, ROOT, read_log

TOLERANCE = 1e-4  # on every logged loss; float32 sums in another order differ by about 1e-6 here


def torchrun(script, *args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume(tmp_path, reference_run):
    """2 ranks x 2 micro-steps of 2 notes, started fresh (rank 0 makes the notes, fits the codec and encodes; rank 1
    waits) and then resumed under torchrun, log the same losses at every step as 1 process with batches of 8
    (FAST_ITERS steps, within TOLERANCE), end with the same weights, and both ranks hold identical parameters."""
    out = tmp_path / "out"
    flags = [*FAST, "--data-dir", str(tmp_path / "data"), "--grad-accum", "2", "--out-dir", str(out)]
    first = torchrun(ROOT / "train.py", *flags, "--max-iters", str(FAST_ITERS // 2), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("training notes") == 1 and first.stdout.count("iter 0:") == 1  # rank 0 alone logs
    assert "2 processes x 2 micro-steps of 2 notes" in first.stdout
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "ckpt.pt", "curves.png", "log.jsonl"]  # rank 0 alone
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == FAST_ITERS // 2

    second = torchrun(ROOT / "tests" / "ddp_worker.py", *flags, "--max-iters", str(FAST_ITERS), "--resume",
                      cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {out / 'ckpt.pt'} at iteration {FAST_ITERS // 2}" in second.stdout
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    two, one = read_log(out), read_log(reference_run)
    assert [e["iter"] for e in two] == [e["iter"] for e in one] == list(range(FAST_ITERS + 1))
    worst = max(abs(a[k] - b[k]) for a, b in zip(two, one) for k in ("train_loss", "val_loss") if b[k] is not None)
    print(f"\nlargest loss difference, 2 processes vs 1, over {FAST_ITERS} steps: {worst:.1e}")
    assert worst < TOLERANCE
    assert two[-1]["val_loss"] < two[0]["val_loss"] - 1.0  # it did learn
    final = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    reference = torch.load(reference_run / "ckpt.pt", weights_only=True)["model"]
    for key in reference:
        assert torch.equal(final[key], rank0[key]), key
        assert torch.allclose(final[key], reference[key], atol=TOLERANCE), key


@pytest.mark.slow
def test_torchrun_with_one_process_sets_up_ddp(tmp_path, fast_data_dir):
    """torchrun --nproc_per_node=1 goes through the process group and DDP as a larger job does (gloo here; NCCL on
    a GPU: tests/test_cuda.py), trains, and saves the model without DDP's "module." prefix."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                             str(ROOT / "train.py"), *FAST, "--data-dir", str(fast_data_dir), "--max-iters", "4",
                             "--out-dir", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP over gloo: 1 process x 1 micro-steps of 8 notes" in result.stdout
    assert [e["iter"] for e in read_log(out)] == list(range(5))
    assert not any(key.startswith("module.") for key in torch.load(out / "ckpt.pt", weights_only=True)["model"])
