"""
What a long run needs to stop cleanly, for any training loop (train.py's, and the codec trainer's):

- StopSignals: a context manager that turns SIGTERM (a cluster pre-empting the job, a polite `kill`), SIGUSR1
  (SLURM's `--signal`) and SIGINT (Ctrl-C) into a request, `stop_requested`, that the loop reads between steps:
  it finishes the step it is in, saves, and exits with the conventional status 128 + the signal's number. A
  second Ctrl-C exits at once (KeyboardInterrupt), for when saving itself hangs.
- agree / largest: a flag (a signal number) that is set on any rank is set on all of them, so that every rank of a
  torchrun job stops (or gives up) at the same step and rank 0 writes the checkpoint. Stopped: the exception a
  trainer raises after saving, carrying the exit status.
- NonFiniteSteps: a step whose loss or gradient norm is NaN or infinite is skipped, as torch.amp.GradScaler skips
  steps with inf gradients: fused AdamW reads `optimizer.found_inf` on the device and leaves the weights, its
  moments and its step count alone when it is 1. So deciding costs no wait for the GPU; the host reads the count
  only where the loop waits anyway (its progress line, its evaluations) and then raises Diverged, one line, when
  MAX_IN_A_ROW steps in a row were skipped: then the weights or the learning rate are to blame, not one batch.
  check_value and check_weights raise it for a non-finite validation loss, and before a checkpoint is written.

Imports torch and nothing of the project: a trainer of any model can use it unchanged.
"""
from __future__ import annotations

import math
import signal
import threading

import torch
import torch.distributed as dist
from torch import Tensor

# Skipped steps in a row that stop the run. One non-finite step is usually one bad batch or a bf16 overflow, and
# skipping it is the cure; five different batches in a row all failing means the weights or the learning rate are
# the problem, and skipping more only spends GPU time.
MAX_IN_A_ROW = 5

# Under torchrun on GPUs, how often (in steps) the ranks compare their stop flags: reading the all-reduced flag
# makes the host wait for the GPU, as the loop's progress line does every 10 steps anyway. On gloo (CPU) and in one
# process reading it costs nothing, so they check after every step.
AGREE_EVERY_ON_GPU = 10


class Diverged(Exception):
    """The run stopped because its losses or weights are no longer finite; one line saying where and what to try."""


class Stopped(Exception):
    """The run stopped at a signal's request, after saving; status is the exit status to end with."""

    def __init__(self, status: int):
        super().__init__(f"stopped by a signal (exit status {status})")
        self.status = status


class StopSignals:
    """Signals turned into a request to stop after the current step:

        with StopSignals() as stop:
            for step in ...:
                ...one optimizer step...
                if stop.agreed(step, device):      # the same answer on every rank
                    ...save a resumable checkpoint...
                    raise Stopped(stop.exit_status)

    Handlers can only be installed from the main thread; elsewhere (a test calling train() from a thread) the
    signals keep their usual meaning and stop_requested stays False."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
        if self.signum is None:
            self.signum = signum

    @property
    def stop_requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_status(self) -> int:
        """128 + the signal's number (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1), as a shell reports a
        process the signal killed, so that a job script or scheduler sees why it ended."""
        return 128 + self.signum

    def agreed(self, step: int, device: str) -> bool:
        """Whether every rank stops after this step (the same answer on all of them). The ranks compare flags only
        every AGREE_EVERY_ON_GPU steps on a GPU, every step elsewhere; one process needs no comparison. A rank that
        got no signal itself takes the one another rank got, for its message and exit status."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.stop_requested
        if device.startswith("cuda") and (step + 1) % AGREE_EVERY_ON_GPU:
            return False
        signum = largest(self.signum or 0, device)
        if signum and self.signum is None:
            self.signum = signum
        return self.stop_requested


def largest(value: int, device: str) -> int:
    """The largest of value over every rank of the process group (value itself in one process). Every rank must
    call it."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def agree(flag: bool, device: str) -> bool:
    """flag, or-ed over every rank of the process group (itself in one process). Every rank must call it."""
    return bool(largest(int(flag), device))


class NonFiniteSteps:
    """The non-finite step guard of one optimizer (fused AdamW or Adam: the fused kernels read found_inf).

        guard = NonFiniteSteps(optimizer, advice="try a lower --lr")
        ...loss.backward(); grad_norm = clip_grad_norm_(...)
        ok = guard.check(loss, grad_norm, step)   # on the device: 1 = the step counts, 0 = it is skipped
        optimizer.step()                          # skipped on the device when it is not ok
        ...every few steps: guard.raise_if_diverged(last_good)   # reads the counts: one wait for the GPU

    Under torchrun the ranks all-reduce the verdict (one scalar, queued on the GPU like DDP's gradients, no wait):
    the gradients are the same on every rank but each rank has its own loss, and the ranks' weights must stay equal.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: str, advice: str, limit: int = MAX_IN_A_ROW):
        if not all(group.get("fused") for group in optimizer.param_groups):
            raise ValueError("NonFiniteSteps needs an optimizer made with fused=True, whose step reads found_inf")
        self.optimizer, self.advice, self.limit = optimizer, advice, limit
        self.found_inf = torch.zeros((), device=device)       # what the fused kernel reads: 1.0 = skip this step
        optimizer.found_inf = self.found_inf
        self.in_a_row = torch.zeros((), device=device)        # skipped steps since the last good one
        self.skipped = torch.zeros((), device=device)         # skipped steps since take_skipped()
        self.tripped_at = torch.full((), -1, device=device)   # the step where in_a_row first reached limit

    def check(self, loss: Tensor, grad_norm: Tensor, step: int) -> Tensor:
        """Tell the optimizer whether to skip this step: 1.0 (counts) or 0.0 (skipped), computed on the device."""
        bad = (~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm.detach()))).float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.found_inf.copy_(bad)
        self.in_a_row.mul_(bad).add_(bad)                      # back to 0 after a good step, +1 after a bad one
        self.skipped.add_(bad)
        first = (self.tripped_at < 0) & (self.in_a_row >= self.limit)
        self.tripped_at.copy_(torch.where(first, step, self.tripped_at))
        return 1.0 - bad

    def take_skipped(self) -> int:
        """The number of steps skipped since the last call (host read: call it where the loop waits anyway)."""
        n = int(self.skipped.item())
        self.skipped.zero_()
        return n

    def state_dict(self) -> dict:
        """The counts, for a checkpoint written between evaluations (a resumed run counts on from them)."""
        return {"in_a_row": int(self.in_a_row.item()), "skipped": int(self.skipped.item())}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row.fill_(state["in_a_row"])
        self.skipped.fill_(state["skipped"])

    def raise_if_diverged(self, last_good: str) -> None:
        """Diverged if MAX_IN_A_ROW steps in a row were skipped since the start. Reads one number from the device."""
        step = int(self.tripped_at.item())
        if step >= 0:
            raise Diverged(f"diverged: steps {step - self.limit + 1}-{step} all had a non-finite loss or gradient "
                           f"norm and were skipped ({self.limit} in a row); {last_good}; {self.advice}")

    def check_value(self, name: str, value: float, step: int, last_good: str) -> None:
        """Diverged if a value read on the host, such as a validation loss, is not finite."""
        if not math.isfinite(value):
            raise Diverged(f"diverged: the {name} at step {step} is {value}; {last_good}; {self.advice}")

    def check_weights(self, tensors, step: int, last_good: str) -> None:
        """Diverged if any weight is not finite: a checkpoint must never hold such weights. One read per call."""
        if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise Diverged(f"diverged: the weights at step {step} are not finite, not saved; {last_good}; "
                           f"{self.advice}")
