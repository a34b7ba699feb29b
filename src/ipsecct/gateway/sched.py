"""How the native forwarding thread is scheduled: ``[native] thread_priority``.

The kernel's own IPsec runs in softirq context, above every process; a userspace data path
in an ordinary thread waits behind whatever else the CPUs run (measured: the demo's 1 ms
stream paused 2-4.5 ms with no transfer at all on a 2-CPU machine). An operator picks:

- ``"normal"``: the thread keeps what the process has (its service manager's
  ``CPUSchedulingPolicy=``/``Nice=``, ``chrt``, ``nice``);
- ``"nice:N"`` (-20..19): the ordinary policy at nice ``N`` (as ``nice -n N``);
- ``"fifo:N"`` (1..99): the real-time ``SCHED_FIFO`` policy at priority ``N`` (as
  ``chrt -f N``): the thread runs as soon as a packet wakes it, before every ordinary task.

The thread applies it to itself when it starts (nothing else of the process changes). A
negative nice or a real-time policy needs root or ``CAP_SYS_NICE`` (or an ``RLIMIT_NICE`` /
``RLIMIT_RTPRIO`` that allows it); where the kernel refuses, the thread logs one warning and
runs at the process's scheduling: never a failure.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

POLICIES = ("normal", "nice", "fifo")
NICE_RANGE = (-20, 19)
FIFO_RANGE = (1, 99)
USAGE = '"normal", "nice:N" (N -20..19) or "fifo:N" (N 1..99)'


@dataclass(frozen=True)
class ThreadPriority:
    policy: str = "normal"  # one of POLICIES
    level: int = 0  # the nice value, or the SCHED_FIFO priority

    def __str__(self) -> str:
        return self.policy if self.policy == "normal" else f"{self.policy}:{self.level}"


NORMAL = ThreadPriority()
DEFAULT = NORMAL


def parse(text: str) -> ThreadPriority:
    """``"normal"``, ``"nice:N"`` or ``"fifo:N"``; a ValueError of one line otherwise."""
    word, sep, number = text.strip().lower().partition(":")
    if word == "normal" and not sep:
        return NORMAL
    if word in ("nice", "fifo") and sep:
        lo, hi = NICE_RANGE if word == "nice" else FIFO_RANGE
        n = number.strip()
        digits = n[1:] if n[:1] in "+-" else n
        if digits.isascii() and digits.isdigit() and len(digits) <= 3 and lo <= int(n) <= hi:
            return ThreadPriority(word, int(n))
        raise ValueError(f"{word}:N takes N from {lo} to {hi}, not {number[:20]!r}")
    raise ValueError(f"must be {USAGE}, not {text[:40]!r}")


def apply(p: ThreadPriority) -> str | None:
    """Puts the calling thread (only it: Linux schedules threads) at ``p``. Returns None, or
    why the kernel refused (the thread's scheduling is then as it was)."""
    tid = 0  # sched_setscheduler(0) is the calling thread
    try:
        if p.policy == "fifo":
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(p.level))
        elif p.policy == "nice":
            # (from a real-time policy inherited from the process: back to the ordinary one)
            if os.sched_getscheduler(tid) != os.SCHED_OTHER:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            # PRIO_PROCESS with a thread id: that thread's nice value (Linux)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), p.level)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def current(tid: int) -> str:
    """Thread ``tid``'s scheduling as the kernel has it, in the setting's words (``"fifo:1"``,
    ``"nice:-5"``, ``"normal"`` for nice 0; ``"rr:N"``, ``"batch"``, ``"idle"`` for
    what an operator's ``chrt`` may have set)."""
    policy = os.sched_getscheduler(tid)
    if policy in (os.SCHED_FIFO, os.SCHED_RR):
        word = "fifo" if policy == os.SCHED_FIFO else "rr"
        return f"{word}:{os.sched_getparam(tid).sched_priority}"
    if policy == os.SCHED_OTHER:
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        return "normal" if nice == 0 else f"nice:{nice}"
    return {getattr(os, "SCHED_BATCH", -1): "batch", getattr(os, "SCHED_IDLE", -1): "idle"}.get(
        policy, str(policy)
    )
