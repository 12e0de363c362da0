"""Multi-process training set-up that cannot silently go wrong.

- Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``) the processes form one process group,
  on CPU too (gloo), or the run refuses: never P independent copies training into one folder.
- The group's timeout (``lslo train --ddp-timeout``) bounds every collective; :class:`Heartbeat`
  lets the process that timed out name the one that stalled.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import torch

__all__ = ["Heartbeat", "distributed_setup", "is_collective_timeout"]


def distributed_setup(cpu: bool, ddp_timeout: int) -> tuple[bool, list, int]:
    """What ``Accelerator(...)`` needs so that a launched job is one job.

    Under torchrun / ``accelerate launch`` (WORLD_SIZE > 1) on a host without a GPU, accelerate forms
    no process group unless told ``cpu=True``: each process would train alone into the same folder.
    The process group's timeout (--ddp-timeout) bounds every collective, so one stalled process ends
    the job instead of hanging it.

    Args:
        cpu: ``--cpu`` as given.
        ddp_timeout: seconds a collective may wait (``--ddp-timeout``).

    Returns:
        ``(cpu, kwargs_handlers, launched)``: the ``cpu`` to pass, the handlers (the process group's
        timeout), and the process count the launcher started (``WORLD_SIZE``, 1 when not launched).
    """
    from accelerate.utils import InitProcessGroupKwargs  # accelerate is heavy: imported when training starts

    try:
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an int, got {os.environ.get('WORLD_SIZE')!r}") from None
    if launched <= 1:
        return cpu, [], launched
    cpu = cpu or not torch.cuda.is_available()
    return cpu, [InitProcessGroupKwargs(timeout=timedelta(seconds=ddp_timeout))], launched


class Heartbeat:
    """Each process records the step it is entering in the launcher's store, so that a collective that
    times out can name the process that stalled (the one that reached the fewest steps)."""

    def __init__(self, world: int, rank: int):
        self.world, self.rank, self.store = world, rank, None
        if world > 1:
            try:
                self.store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                        is_master=False, timeout=timedelta(seconds=10))
            except Exception:  # noqa: BLE001 (no store reachable: the timeout message names no rank)
                self.store = None

    def beat(self, step: int) -> None:
        if self.store is not None:
            self.store.set(f"lslo/heartbeat/{self.rank}", str(step))

    def stalled(self) -> str:
        """Who stalled, as well as the store can tell."""
        if self.store is None:
            return "another process stalled or died"
        steps = {}
        self.store.set_timeout(timedelta(seconds=2))
        for rank in range(self.world):
            try:
                steps[rank] = int(self.store.get(f"lslo/heartbeat/{rank}"))
            except Exception:  # noqa: BLE001 (a process that never reached step 1)
                steps[rank] = 0
        lowest = min(steps.values())
        behind = [r for r, s in steps.items() if s == lowest and r != self.rank]
        if not behind:
            return f"the other processes are ahead of rank {self.rank}"
        return "rank " + ", ".join(map(str, behind)) + f" stalled or died (it last started step {lowest}; rank " \
            f"{self.rank} waited in step {steps[self.rank]})"


def is_collective_timeout(exc: BaseException) -> bool:
    """Whether a RuntimeError of torch.distributed (gloo, NCCL) reports a collective that timed out."""
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text or "connection closed by peer" in text


class _SignalFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and stops. A second
    signal restores the default behaviour (a second Ctrl-C kills at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, signals behave as usual
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)
