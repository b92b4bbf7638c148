"""Keeping long runs alive: non-finite guard, atomic checkpoints, exact resume.

* `NonFiniteGuard` checks the loss (before backward) and the gradients (before every
  optimiser step). On a NaN/inf it stops the run with `NonFiniteError` naming the step, the
  batch and its rows' `index` values, without applying the update, so the weights in memory
  and every checkpoint on disk stay finite. With `on_nonfinite="skip"` the update is dropped
  instead (gradients set to None: the optimiser leaves those parameters alone) and the run
  goes on, up to `max_skipped_batches`; skipped steps are counted, logged and checkpointed.
* `AtomicCheckpointIO` writes `<dir>/.<name>.<pid>.tmp`, fsyncs, then renames it over the
  target: a kill during a save leaves the previous checkpoint whole. It loads with
  `weights_only=True` unless told otherwise.
* `ResumableSampler` (used by `AlignDataModule`) orders an epoch from `(seed, epoch)` alone
  and can start part-way through it, so a resumed run skips the batches it already trained on.
* `RNGStates` saves the torch / numpy / python RNG states with each checkpoint and restores them
  when training restarts, so dropout and sampling continue exactly.

`reliability_callbacks()` is what `lit-align fit` adds to every run.
"""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

from lit_align.checks import ConfigError

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A NaN or inf in the loss, the gradients or the weights about to be checkpointed."""


# ---------------------------------------------------------------------------- non-finite guard
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor -> this rank's shard


def nonfinite_names(named_tensors, limit: int = 3) -> tuple[list[str], int]:
    """Up to `limit` names of tensors holding NaN/inf, and how many such tensors there are."""
    bad = [name for name, t in named_tensors if t is not None and not bool(torch.isfinite(_local(t)).all())]
    return bad[:limit], len(bad)


class NonFiniteGuard(Callback):
    """Stop (or skip) on a non-finite loss or gradient; never checkpoint non-finite weights.

    Args:
        on_nonfinite: "stop" raises `NonFiniteError` before the bad update is applied;
            "skip" drops that optimiser step and continues.
        max_skipped_batches: In skip mode, stop once more than this many steps were skipped.
        check_checkpoints: Refuse to write a checkpoint whose weights hold NaN/inf.
        default: Set on the guard `lit-align fit` adds by itself; it steps aside when the user
            configured a NonFiniteGuard of their own under `trainer.callbacks`.
    """

    def __init__(
        self,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        max_skipped_batches: int = 10,
        check_checkpoints: bool = True,
        default: bool = False,
    ):
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard on_nonfinite={on_nonfinite!r}: choose 'stop' or 'skip'")
        self.on_nonfinite, self.max_skipped_batches = on_nonfinite, int(max_skipped_batches)
        self.check_checkpoints, self.default, self.enabled = check_checkpoints, default, True
        self.skipped = 0  # checkpointed, so the limit holds across resumes
        self.skipped_at: list[dict] = []
        self._bad_loss: Optional[float] = None
        self._batches: list[tuple[int, list]] = []  # (batch_idx, row indices) since the last step
        self._stepped = False
        self._grad_norm = 0.0

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard[default]" if self.default else "NonFiniteGuard"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.default and any(isinstance(c, NonFiniteGuard) and not c.default for c in trainer.callbacks):
            self.enabled = False

    # ---------------------------------------------------------------- observation
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not self.enabled:
            return
        if self._stepped:  # accumulated batches belong to one step; a new step starts here
            self._batches, self._stepped = [], False
        rows = batch.get("index") if isinstance(batch, dict) else None
        self._batches.append((batch_idx, rows.tolist() if torch.is_tensor(rows) else rows))

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self.enabled and self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = float(loss.detach().float().sum())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.enabled:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # one fused norm and one sync: NaN/inf in any gradient makes the norm NaN/inf
        self._grad_norm = float(torch.nn.utils.get_total_norm([_local(p.grad) for p in params if p.grad is not None]))
        local_bad = self._bad_loss is not None or not math.isfinite(self._grad_norm)
        self._stepped = True
        # DDP/FSDP: every rank takes the same decision, or the healthy ones would hang
        if not trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            self._bad_loss = None
            return
        message = self.describe(trainer, pl_module, optimizer)
        for p in params:  # drop the update: the optimiser skips parameters without gradients
            p.grad = None
        if self.on_nonfinite == "skip" and self.skipped < self.max_skipped_batches:
            self.skipped += 1
            self.skipped_at.append({"step": trainer.global_step, "batches": [b for b, _ in self._batches]})
            log.warning("%s; skipped (%d of at most %d)", message, self.skipped, self.max_skipped_batches)
            self._bad_loss = None
            return
        if self.on_nonfinite == "skip":
            message += f"; more than max_skipped_batches={self.max_skipped_batches} steps were non-finite"
        raise NonFiniteError(message + self._advice(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.enabled and self.on_nonfinite == "skip":
            pl_module.log("nonfinite/skipped_batches", float(self.skipped), on_step=True, on_epoch=False)

    def describe(self, trainer, pl_module, optimizer) -> str:
        """Where the non-finite value is: step, epoch, batch indices and row `index` values."""
        names = {id(p): n for n, p in pl_module.named_parameters()}
        named_grads = [(names.get(id(p), "?"), p.grad) for g in optimizer.param_groups for p in g["params"]]
        bad, count = nonfinite_names(named_grads)
        what = [f"loss = {self._bad_loss}"] if self._bad_loss is not None else []
        if count:
            what.append(f"non-finite gradients in {count} parameters (e.g. {', '.join(bad)})")
        elif not math.isfinite(self._grad_norm):
            what.append(f"the gradient norm overflows ({self._grad_norm})")
        if not what:
            what.append("non-finite values on another rank")
        batches = ", ".join(f"batch {b} (rows index {rows})" for b, rows in self._batches) or "batch ?"
        return (
            f"non-finite training step {trainer.global_step} (epoch {trainer.current_epoch}, {batches}): "
            + "; ".join(what)
        )

    def _advice(self, trainer) -> str:
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", ""
        )
        kept = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
        return (
            f". The update was not applied and {kept}. Check these rows, lower the learning rate, or "
            "add gradient clipping; NonFiniteGuard(on_nonfinite='skip', max_skipped_batches=N) skips such steps."
        )

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if not (self.enabled and self.check_checkpoints):
            return
        state = checkpoint.get("state_dict") or {}
        bad, count = nonfinite_names((k, v) for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point())
        if count:
            raise NonFiniteError(
                f"refusing to write a checkpoint at step {trainer.global_step}: {count} tensors hold NaN/inf "
                f"(e.g. {', '.join(bad)}); the previous checkpoints are kept"
            )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "skipped_at": self.skipped_at}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.skipped_at = list(state.get("skipped_at", []))


# ---------------------------------------------------------------------------- atomic checkpoints
class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temp file in the target's directory, fsync, rename over the target.

    Lightning's own save goes through a temp file in the *system* temp dir and `shutil.move`,
    which degrades to an in-place copy when the checkpoint dir is another filesystem; here
    the rename is always within one directory, so it is atomic on POSIX.
    """

    def __init__(self, weights_only: bool = True):
        self.weights_only = weights_only

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: Optional[bool] = None):
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return pl_load(path, map_location=map_location, weights_only=self.weights_only if weights_only is None else weights_only)


class AtomicCheckpoints(Callback):
    """Installs `AtomicCheckpointIO` on strategies that save one file through `TorchCheckpointIO`."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if type(io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()


# ---------------------------------------------------------------------------- exact resume
class ResumableSampler(DistributedSampler):
    """`DistributedSampler` whose position inside an epoch is part of its state.

    The order of epoch `e` is a function of `(seed, e)` only (nothing carries over from earlier
    epochs), and `state_dict()` records how many of this rank's samples were trained on, so a
    resumed run continues with the next unseen batch. Works for one process too.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0  # samples of this epoch to skip (set when resuming)
        self.consumed = 0  # samples of this epoch handed to training (advanced by the DataModule)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start, self.consumed = epoch, 0, 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        self.consumed = start
        return iter(indices[start:])

    def advance(self, n: int) -> None:
        """Record that `n` more samples went into training (called once per trained batch)."""
        self.consumed += n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"cannot resume the data order: the checkpoint's sampler had {state['num_samples']} samples "
                f"per rank and seed {state['seed']}, this run has {self.num_samples} and {self.seed}; resume "
                "with the same data, data.seed and number of devices"
            )
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= self.num_samples:  # saved at the end of an epoch
            epoch, consumed = epoch + 1, 0
        self.epoch, self.start, self.consumed = epoch, consumed, consumed


class ResumableDataLoader(DataLoader):
    """A DataLoader whose state is its `ResumableSampler`'s (Lightning then sees a resumable loader)."""

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class RNGStates(Callback):
    """Save the global RNG states with each checkpoint; restore them when training restarts.

    They are restored at `on_train_start`, after the sanity check, so the resumed run's first
    step draws the same random numbers as the uninterrupted run's.
    """

    def __init__(self):
        self._pending: Optional[dict] = None

    @property
    def state_key(self) -> str:
        return "RNGStates"

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def on_train_start(self, trainer, pl_module) -> None:
        state, self._pending = self._pending, None
        if not state:
            return
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
        random.setstate(_as_tuples(state["python"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------- failures
_COLLECTIVE_FAILURES = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "gloo", "nccl")


def is_collective_failure(exception: BaseException) -> bool:
    """A failed collective: another rank died, hung, or the network between them broke."""
    dist_errors = tuple(
        getattr(torch.distributed, name) for name in ("DistError", "DistBackendError") if hasattr(torch.distributed, name)
    )
    return isinstance(exception, dist_errors) or any(k in str(exception).lower() for k in _COLLECTIVE_FAILURES)


class FailureReport(Callback):
    """On any exception, say where the run stopped and how to resume it; in a distributed run,
    say plainly when the cause is another rank (a collective failed or timed out)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        where = f"rank {trainer.global_rank} of {trainer.world_size}: training stopped at step {trainer.global_step} (epoch {trainer.current_epoch})"
        resume = f"Resume from the last checkpoint ({ckpt}) with --ckpt_path"
        first_line = str(exception).strip().splitlines()[0] if str(exception).strip() else ""
        if trainer.world_size > 1 and is_collective_failure(exception):
            log.error(
                "%s because a collective operation failed: another process of this run died, hung or lost its "
                "connection (%s: %s). Check the other ranks' logs. %s.", where, type(exception).__name__, first_line[:300], resume,
            )
        elif not isinstance(exception, (NonFiniteError, KeyboardInterrupt, ConfigError)):  # a ConfigError says what to change
            log.error("%s by %s: %s. %s.", where, type(exception).__name__, first_line[:300], resume)


# ---------------------------------------------------------------------------- defaults
def reliability_callbacks(on_nonfinite: str = "stop", max_skipped_batches: int = 10) -> list[Callback]:
    """The callbacks every `lit-align fit` run gets: guard, atomic checkpoints, RNG states, failure report."""
    guard = NonFiniteGuard(on_nonfinite, max_skipped_batches, default=True)
    return [guard, AtomicCheckpoints(), RNGStates(), FailureReport()]


__all__ = [
    "AtomicCheckpointIO",
    "AtomicCheckpoints",
    "FailureReport",
    "NonFiniteError",
    "NonFiniteGuard",
    "RNGStates",
    "ResumableDataLoader",
    "ResumableSampler",
    "reliability_callbacks",
]
