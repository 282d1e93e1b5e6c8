"""
What a long training run needs around its learning loop, shared by train.py and train_codec.py:

    run = LongRun(out_dir, max_iters, eval_interval, device, resumed, advice="try a lower --lr")
    ...the data, the model and its optimizer, on run.device...
    run.start(model, optimizer, batches)          # on --resume: their states, the random streams and the log put back
    model = run.wrap(model)                       # DistributedDataParallel under torchrun
    with run:                                     # SIGTERM, SIGINT, SIGUSR1: finish the step, save it, exit 128 + N
        for it in range(run.start_iter, max_iters + 1):
            if run.should_evaluate(it):
                metrics = run.evaluate(it, measure)   # logged, with the training loss since the last one
                run.save(it, checkpoint)              # ckpt.pt: all that --resume needs
            if it == max_iters:
                break
            ...batch, forward, loss, backward...
            run.skip_if_not_finite(loss, grad_norm, it)
            optimizer.step()
            if run.step_done(it, loss):               # a signal came: save this step and stop
                run.stop(it + 1, checkpoint)

Under torchrun every rank runs the loop on its share of each batch, and rank 0 alone logs and writes files. A checkpoint
holds every random stream, so that --resume goes on as if the run had never stopped. A step whose loss or gradient
norm is NaN or infinite is skipped on the device, as torch.amp.GradScaler skips inf gradients; MAX_IN_A_ROW of them in
a row, a non-finite validation loss or non-finite weights stop the run with one line (Diverged), and no checkpoint
ever holds such weights.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint, upgraded
from figures import CurvesWriter
from files import DataError, append_log, rewrite_log

MAX_IN_A_ROW = 5   # non-finite steps in a row that stop the run: one is a bad batch, five are the weights or the lr
READ_EVERY = 10    # steps between the host's reads of the progress (on a GPU a read waits for it)


class Diverged(Exception):
    """The run stopped because its losses or weights are no longer finite; one line saying where and what to try."""


class Stopped(Exception):
    """The run stopped at a signal's request, after saving; status is the exit status to end with."""

    def __init__(self, status: int):
        super().__init__(f"stopped by a signal (exit status {status})")
        self.status = status


class LongRun:
    """One training run's processes, checkpoints, log, progress and stop requests (used as this file's top shows)."""

    def __init__(self, out_dir: str | Path, max_iters: int, eval_interval: int, device: str,
                 resumed: dict | None = None, advice: str = "", desc: str = "training", draw=None):
        self.rank, self.world, self.device = setup_distributed(device)
        self.master = self.rank == 0                     # the one process that logs and writes files
        if self.world > 1:  # for waiting on rank 0, which can take longer than NCCL's 10-minute timeout
            self.cpu_group = dist.new_group(backend="gloo", timeout=timedelta(hours=6))
        self.out_dir, self.max_iters, self.eval_interval = Path(out_dir), max_iters, eval_interval
        self.resumed, self.advice, self.desc = resumed, advice, desc
        self.curves = CurvesWriter(self.out_dir, draw=draw)    # curves.png, redrawn from the log
        self.signals = StopSignals()

    @property
    def ddp(self) -> str:
        """What the processes are, for a run's first line: "DDP over nccl: 4 processes", or "" without torchrun."""
        if not dist.is_initialized():
            return ""
        return f"DDP over {dist.get_backend()}: {self.world} process{'es' if self.world > 1 else ''}"

    def on_rank_zero_first(self, work: Callable[[], object]):
        """work() on rank 0 while the others wait (to find its downloads and caches on disk), its DataError raised on
        every rank. Returns what work() returns on rank 0, None on the others."""
        if self.world == 1:
            return work()
        error, result = [None], None
        if self.rank == 0:
            try:
                result = work()
            except DataError as e:
                error = [str(e)]
        dist.broadcast_object_list(error, src=0, group=self.cpu_group)
        if error[0] is not None:
            raise DataError(error[0])
        return result

    def broadcast(self, value):
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: torch.Generator,
              config: dict | None = None, also: dict | None = None) -> None:
        """The model, its fused optimizer, the batch generator and `also` (more objects saved under their names) to
        save and guard. On --resume: their states, the random streams and the log put back, once the checkpoint's
        config is found to be `config`, this run's."""
        self.model, self.optimizer, self.batches, self.also = model, optimizer, batches, also or {}
        self.guard = NonFiniteSteps(optimizer, self.device, self.advice)
        self.loss_sum = torch.zeros((), device=self.device)   # the training loss since the last evaluation, summed on
        self.steps = torch.zeros((), device=self.device)      # the device over the steps that counted (not skipped)
        self.start_iter, self.last_metrics, self.last_saved, self.train_s = 0, None, None, 0.0
        if self.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.resumed:
            self.restore(self.resumed, config or {})
        self.bar = tqdm(total=self.max_iters, initial=self.start_iter, desc=self.desc, unit="step",
                        disable=None if self.master else True)
        self.t0, self.timed = time.time(), None

    def restore(self, ckpt: dict, config: dict) -> None:
        """Everything as the checkpoint saved it, or a CheckpointError naming it."""
        path = self.out_dir / "ckpt.pt"
        saved = ckpt["config"] if isinstance(ckpt.get("config"), dict) else {}
        differ = [f"{k} {v} != {config[k]}" for k, v in saved.items() if k in config and config[k] != v]
        if differ:
            raise CheckpointError(f"{path}: made for another model or data than this run builds "
                                  f"({', '.join(differ)}; checkpoint != this run)")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            for name, thing in self.also.items():
                thing.load_state_dict(ckpt[name])
            restore_random_states(ckpt["rng"], self.rank, self.device, self.batches)
            self.start_iter, self.last_metrics = int(ckpt["iter_num"]), ckpt["metrics"]
            json.dumps(self.last_metrics)  # it goes back into the log
            interval = ckpt.get("interval")  # stopped between evaluations: the sums so far count towards the next
            if interval:
                self.loss_sum += interval["train_loss_sum"].to(self.device)
                self.steps += interval["steps"].to(self.device)
                self.guard.load_state_dict(interval["guard"])
            self.train_s = float((interval or self.last_metrics).get("train_s", 0.0))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: {reason})") from None
        self.last_saved = self.start_iter
        if self.master:
            rewrite_log(self.out_dir / "log.jsonl", self.last_metrics)
            print(f"resuming from {path} at iteration {self.start_iter}")

    def wrap(self, model: torch.nn.Module, compile: bool = False, broadcast_buffers: bool = True) -> torch.nn.Module:
        """torch.compile, then DistributedDataParallel under torchrun (as nanoGPT). DDP gives every rank rank 0's
        weights (and buffers, at every forward, with broadcast_buffers) and averages the gradients inside backward().
        The unwrapped model is the one saved: no "_orig_mod." or "module." in its keys."""
        if compile:
            model = torch.compile(model)
        if dist.is_initialized():  # under torchrun, one process too (setup_distributed)
            device_ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            model = DDP(model, device_ids=device_ids, broadcast_buffers=broadcast_buffers)
        return model

    def __enter__(self) -> LongRun:
        self.signals.__enter__()
        self.clock = time.time()    # for train_s: the time spent in steps
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.signals.__exit__(*exc)

    # ------------------------------------------------------------------------------------------------
    # In the loop

    def should_evaluate(self, it: int) -> bool:
        """Every eval_interval steps and at the last, except the step the run resumed at (its checkpoint holds it)."""
        due = it % self.eval_interval == 0 or it == self.max_iters
        return due and not (self.last_metrics is not None and self.last_metrics["iter"] == it)

    def evaluate(self, it: int, measure: Callable[[], dict], **more) -> dict | None:
        """The evaluation at step it (every rank calls it): the training loss since the last one, the steps skipped,
        what measure() returns on rank 0 ("val_loss"...) and `more`, checked finite and logged. Returns them on rank 0,
        None elsewhere."""
        counted = int(self.steps.item())
        train_loss = global_mean(self.loss_sum / counted, self.world) if counted else None
        skipped = self.guard.take_skipped()
        self.guard.raise_if_diverged(self.last_good())
        self.rng = random_states(self.world, self.device, self.batches)   # before measure(), which may draw noise
        metrics = None
        if self.master:
            metrics = {"iter": it, "train_loss": train_loss, "skipped_steps": skipped, **measure(), **more,
                       "elapsed_s": round(time.time() - self.t0, 2)}
        # rank 0 measures; every rank must learn that it failed, or the others would wait for it forever
        if agree(self.master and not math.isfinite(metrics["val_loss"]), self.device):
            self.guard.check_value("validation loss", metrics["val_loss"] if self.master else math.nan, it,
                                   self.last_good())
        self.guard.check_weights(self.model.state_dict().values(), it, self.last_good())
        if self.master:
            append_log(self.out_dir / "log.jsonl", metrics)
        return metrics

    def save(self, it: int, ckpt: dict) -> None:
        """ckpt.pt after the evaluation at step it: ckpt with the optimizer and random streams. The sums start again."""
        if self.master:
            save_checkpoint(self.resumable(ckpt, self.rng), self.out_dir / "ckpt.pt")
            self.curves.update(final=it == self.max_iters)  # after the checkpoint: it matters more
        self.last_metrics, self.last_saved = ckpt["metrics"], it
        self.loss_sum.zero_()
        self.steps.zero_()
        self.clock = time.time()

    def resumable(self, ckpt: dict, rng: dict) -> dict:
        return {**ckpt, "optimizer": self.optimizer.state_dict(), "rng": rng,
                **{name: thing.state_dict() for name, thing in self.also.items()}}

    def skip_if_not_finite(self, loss: Tensor, grad_norm: Tensor, it: int) -> None:
        """Before optimizer.step(): the fused optimizer is to skip this step if loss or grad_norm is NaN or infinite."""
        self.counts = self.guard.check(loss, grad_norm, it)

    def step_done(self, it: int, loss: Tensor) -> bool:
        """After optimizer.step(): the step's loss counts towards the next evaluation (unless the step was skipped),
        the progress bar moves, every READ_EVERY steps the skipped steps are checked and, once, the time left is
        estimated. True when every rank is to stop here (a signal came)."""
        self.loss_sum += torch.where(self.counts > 0, loss.detach(), 0.0)   # (NaN x 0 would still be NaN)
        self.steps += self.counts
        now = time.time()
        self.train_s, self.clock = self.train_s + now - self.clock, now
        self.bar.update(1)
        if (it + 1) % READ_EVERY == 0:
            self.guard.raise_if_diverged(self.last_good())
            self.bar.set_postfix(loss=f"{global_mean(self.loss_sum / self.steps.clamp(min=1), self.world):.3f}",
                                 skipped=int(self.guard.skipped.item()))
            if self.master and self.timed and it + 1 - self.timed[0] >= 5:
                seconds_per_step = (self.train_s - self.timed[1]) / (it + 1 - self.timed[0])
                tqdm.write(time_estimate(seconds_per_step, self.max_iters - it - 1))
                self.timed = False
        if self.timed is None:
            self.timed = (it + 1, self.train_s)   # the first step warms up: the estimate leaves it out
        return self.signals.agreed(it, self.device)

    def stop(self, it: int, ckpt: dict):
        """ckpt.pt at step it, between evaluations, as resumable as theirs: ckpt with the optimizer, every rank's random
        streams and the sums the next evaluation needs (its metrics and the log stay the last evaluation's). Then
        Stopped, with the exit status."""
        self.bar.close()
        rng = random_states(self.world, self.device, self.batches)
        self.guard.check_weights(self.model.state_dict().values(), it, self.last_good())
        interval = {"train_loss_sum": torch.tensor(global_mean(self.loss_sum, self.world)), "steps": self.steps.cpu(),
                    "guard": self.guard.state_dict(), "train_s": self.train_s}
        if self.master:
            save_checkpoint({**self.resumable(ckpt, rng), "interval": interval}, self.out_dir / "ckpt.pt")
            print(f"stopped by {self.signals.name} after step {it}: saved {self.out_dir / 'ckpt.pt'}; "
                  "to continue, run the same command with --resume", flush=True)
        if self.world > 1:
            dist.barrier()  # no rank exits before rank 0 has saved: torchrun would stop it mid-write
        raise Stopped(self.signals.exit_status)

    def last_good(self) -> str:
        """Where a diverged run can be continued from (every checkpoint written had finite weights)."""
        if self.last_saved is None:
            return "no checkpoint was written"
        return f"the last checkpoint with finite weights is {self.out_dir / 'ckpt.pt'} (iteration {self.last_saved})"


def time_estimate(seconds_per_step: float, steps_left: int) -> str:
    """How long the rest of the run takes at the speed of its first steps: nobody should wait days unawares."""
    left = seconds_per_step * steps_left
    amount = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.0f} min" if left >= 60 else f"{left:.0f} s"
    return (f"{seconds_per_step:.3g} s per step: about {amount} at this speed for the {steps_left} steps left "
            "(evaluations not included)")


# ----------------------------------------------------------------------------------------------------
# Exact resume

def checkpoint_to_resume(args, run_flags: tuple[str, ...], needs: tuple[str, ...], program: str) -> dict | None:
    """With --resume, OUT_DIR/ckpt.pt (checkpoint.upgraded), checked to hold what resuming needs; its run_flags (those
    that define the data and the model) replace args'."""
    if not args.resume:
        return None
    path = Path(args.out_dir) / "ckpt.pt"
    resumed = upgraded(load_checkpoint(path))
    missing = [k for k in ("args", "model", "optimizer", "iter_num", "metrics", "rng", *needs) if k not in resumed]
    saved = resumed["args"] if isinstance(resumed.get("args"), dict) else {}
    if "args" not in missing:
        missing += [f"args.{name}" for name in run_flags if name not in saved]
    if missing:
        raise CheckpointError(f"{path}: cannot resume from it, it has no {', '.join(missing)} "
                              f"(not a checkpoint of {program}?)")
    for name in run_flags:
        setattr(args, name, saved[name])
    return resumed


def random_states(world: int, device: str, batches: torch.Generator) -> dict:
    """Every random stream: the batch generator (the same on all ranks) and each rank's torch (and CUDA) state, which
    drives dropout. Every rank must call this."""
    rng = {"torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        rng["cuda"] = torch.cuda.get_rng_state()
    ranks = [rng]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, rng)
    return {**ranks[0], "batches": batches.get_state(), **({"ranks": ranks} if world > 1 else {})}


def restore_random_states(rng: dict, rank: int, device: str, batches: torch.Generator) -> None:
    """Put back what random_states saved; ranks beyond those saved (resuming on more processes) keep their seed."""
    states = rng.get("ranks") or [rng]
    if rank < len(states):
        torch.set_rng_state(states[rank]["torch"])
        if device.startswith("cuda") and "cuda" in states[rank]:
            torch.cuda.set_rng_state(states[rank]["cuda"])
    batches.set_state(rng["batches"])


# ----------------------------------------------------------------------------------------------------
# Several processes (torchrun)

def setup_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this process, which torchrun says in RANK, LOCAL_RANK and WORLD_SIZE; rank 0 of 1
    without torchrun. Under torchrun the process group is set up for one process too: one GPU tests a larger job's
    code."""
    if "RANK" not in os.environ:
        return 0, 1, device
    world, rank, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            gpus = torch.cuda.device_count()
            raise DataError(f"torchrun started more processes on this node than it has CUDA devices ({gpus}): "
                            f"use --nproc_per_node={gpus} or less")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # NCCL moves the gradients from GPU to GPU; gloo does it between CPU processes
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def global_mean(x: Tensor, world: int) -> float:
    """x averaged over the ranks: the loss of the whole batch, not of this rank's share of it."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x.item()


def largest(value: int, device: str) -> int:
    """The largest of value over every rank (value itself in one process). Every rank must call it."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def agree(flag: bool, device: str) -> bool:
    """flag, or-ed over every rank (itself in one process). Every rank must call it."""
    return bool(largest(int(flag), device))


# ----------------------------------------------------------------------------------------------------
# Stop signals

class StopSignals:
    """SIGTERM (a cluster pre-empting the job), SIGUSR1 (SLURM's --signal) and SIGINT (Ctrl-C) turned into a request to
    stop after the step, inside `with StopSignals()`; a second Ctrl-C exits at once. Only the main thread can install
    handlers: elsewhere the signals keep their usual meaning."""

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
        """128 + the signal's number, as a shell reports a process the signal killed."""
        return 128 + self.signum

    def agreed(self, step: int, device: str) -> bool:
        """Whether every rank stops after this step: the ranks compare signal numbers (every READ_EVERY steps on GPUs)
        and take the largest, for their message and exit status too."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.stop_requested
        if device.startswith("cuda") and (step + 1) % READ_EVERY:
            return False
        signum = largest(self.signum or 0, device)
        if signum and self.signum is None:
            self.signum = signum
        return self.stop_requested


# ----------------------------------------------------------------------------------------------------
# Non-finite steps

class NonFiniteSteps:
    """The non-finite step guard of a fused optimizer (AdamW or Adam), whose step reads optimizer.found_inf on the
    device and changes nothing (weights, moments, step count) when it is 1. The ranks all-reduce the verdict: each has
    its own loss, and their weights must stay equal."""

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
        """The steps skipped since the last call (a host read)."""
        n = int(self.skipped.item())
        self.skipped.zero_()
        return n

    def state_dict(self) -> dict:
        return {"in_a_row": int(self.in_a_row.item()), "skipped": int(self.skipped.item())}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row.fill_(state["in_a_row"])
        self.skipped.fill_(state["skipped"])

    def raise_if_diverged(self, last_good: str) -> None:
        """Diverged if `limit` steps in a row were skipped. A host read."""
        step = int(self.tripped_at.item())
        if step >= 0:
            raise Diverged(f"diverged: steps {step - self.limit + 1}-{step} all had a non-finite loss or gradient "
                           f"norm and were skipped ({self.limit} in a row); {last_good}; {self.advice}")

    def check_value(self, name: str, value: float, step: int, last_good: str) -> None:
        """Diverged if a value read on the host, such as a validation loss, is not finite."""
        if not math.isfinite(value):
            raise Diverged(f"diverged: the {name} at step {step} is {value}; {last_good}; {self.advice}")

    def check_weights(self, tensors, step: int, last_good: str) -> None:
        """Diverged if any weight is not finite: no checkpoint may hold one."""
        if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise Diverged(f"diverged: the weights at step {step} are not finite, not saved; {last_good}; "
                           f"{self.advice}")
