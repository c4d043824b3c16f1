"""The runs of an instance and the pool slots they hold (`llm`, `subject_model`): a run whose process is gone never
blocks the next one, and a run waiting on a slot says so, sleeps, and stops when told.

- **Whose process.** A run `ndx-pipeline run` executes carries its process in its tags (`process_tags`: the process
  id, the host, and the process's start time, so that a reused process id is not taken for the run's process).
- **Killed runs.** `release_stale_runs(instance)` marks every unfinished run whose recorded process is gone failed,
  with the reason, and frees its slots and its places in the pools' queues; it also frees what runs that already
  ended still hold. It returns one sentence per run it released ("an earlier run 6adacd5a was killed; marked failed
  and its `llm` slot released"). The CLI calls it before `run`, `view` and `lineage`, the sensors before they look
  at anything, and a run waiting on a slot every `WAIT_LINE_S` seconds (the holder may have died meanwhile). Runs
  launched by `dagster dev` carry no process tags: there the code server marks a run whose process died failed, and
  the daemon's run monitoring (the shipped dagster.yaml) frees the slots of runs that ended.
- **Waiting.** Dagster's in-process executor waits for a pool slot by spinning: its concurrency context's
  `interval_to_next_pending_claim_check` is never above 0, so the loop never sleeps (100 % CPU), never logs, and
  never reaches a point where SIGTERM or Ctrl-C is acted on. `waiting_on_pools` puts `PoolWait` in its place for the
  runs this process executes: it sleeps between checks (at most `POLL_S`), says every `WAIT_LINE_S` seconds which
  pool it waits for, which run holds the slot and for how long, gives up after `wait_s` seconds with that sentence
  (`PoolWaitExceeded`), and on SIGTERM or Ctrl-C, waiting or running a step, marks its run canceled and frees its
  slots before Dagster ends the run.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.storage.dagster_run import FINISHED_STATUSES, NOT_FINISHED_STATUSES
from dagster._utils.interrupts import check_captured_interrupt

from ndx_pipeline.core.progress import duration

PID_TAG, HOST_TAG, PROCESS_START_TAG = "ndx/pid", "ndx/host", "ndx/process_start"
# on a run that was killed (marked failed here) or stopped by SIGTERM / Ctrl-C (canceled): why; the next run of the
# same command resumes from it (ndx_pipeline.defs.resume)
INTERRUPTED_TAG = "ndx/interrupted"
WAIT_LINE_S = 10.0  # a waiting run says so this often
POLL_S = 1.0  # and checks for a free slot (and for SIGTERM / Ctrl-C) at least this often


def this_host() -> str:
    return socket.gethostname()


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, from /proc), or None where there is no /proc; "" when
    there is no such process or it is a zombie (killed, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except FileNotFoundError:
        return "" if os.path.isdir("/proc/self") else None
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (command) ": state is field 3, starttime field 22
    return "" if fields[0] in ("Z", "X") else fields[19]


def process_tags() -> dict[str, str]:
    """The tags that say which process executes a run: this one."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: this_host(), PROCESS_START_TAG: process_start(os.getpid()) or ""}


def process_gone(tags) -> str | None:
    """Why the process a run's tags name is gone ("process 1234 on this host is gone"), or None: it is alive, or it
    is on another host, or the run names no process (launched by `dagster dev`, a sensor, another machine)."""
    if HOST_TAG not in tags or PID_TAG not in tags or tags[HOST_TAG] != this_host():
        return None
    pid = int(tags[PID_TAG])
    started = process_start(pid)
    if started is None and os.name == "nt":  # (os.kill there ends the process whatever the signal)
        return None
    if started is None:  # no /proc: whether the process id exists
        try:
            os.kill(pid, 0)
            return None
        except ProcessLookupError:
            return f"process {pid} on this host is gone"
        except PermissionError:
            return None
    if started == "":
        return f"process {pid} on this host is gone"
    if tags.get(PROCESS_START_TAG) and started != tags[PROCESS_START_TAG]:
        return f"process {pid} on this host is gone (its id now belongs to another process)"
    return None


def _pool_infos(instance: dg.DagsterInstance) -> dict:
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    return dict(storage.get_concurrency_infos(sorted(storage.get_concurrency_keys())))


def held_by(infos: dict, run_id: str) -> tuple[list[str], list[str]]:
    """(the pools where run `run_id` holds a slot, those where it only has a place in the queue)."""
    claimed = [pool for pool, info in infos.items() if any(s.run_id == run_id for s in info.claimed_slots)]
    queued = [pool for pool, info in infos.items() if pool not in claimed
              and any(p.run_id == run_id for p in info.pending_steps)]
    return claimed, queued


def _names(pools: list[str]) -> str:
    return " and ".join(f"`{p}`" for p in pools)


def released_what(claimed: list[str], queued: list[str]) -> str:
    """What freeing a run's concurrency rows released, in words."""
    parts = []
    if claimed:
        parts.append(f"its {_names(claimed)} slot{'s' if len(claimed) > 1 else ''}")
    if queued:
        parts.append(f"its place in the {_names(queued)} queue{'s' if len(queued) > 1 else ''}")
    return " and ".join(parts)


def release_stale_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every unfinished run of `instance` whose process (its tags) is gone, free its slots and queue
    places, and free what finished runs still hold. One sentence per run released."""
    said = []
    infos = None
    for record in instance.get_run_records(dg.RunsFilter(statuses=NOT_FINISHED_STATUSES,
                                                         tags={HOST_TAG: this_host()})):
        run = record.dagster_run
        why = process_gone(run.tags)
        if why is None or instance.get_run_by_id(run.run_id).is_finished:  # (another command released it first)
            continue
        infos = _pool_infos(instance) if infos is None else infos
        claimed, queued = held_by(infos, run.run_id)
        instance.add_run_tags(run.run_id, {INTERRUPTED_TAG: f"killed ({why})"})
        instance.report_run_failed(run, f"{why}: the run was killed (kill -9, out of memory, a closed session) "
                                        "before it ended; marked failed by ndx-pipeline, its pool slots released.")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        what = released_what(claimed, queued)
        said.append(f"an earlier run {run.run_id[:8]} was killed; marked failed"
                    + (f" and {what} released" if what else " (it held no pool slot)"))
    if not instance.event_log_storage.supports_global_concurrency_limits:
        return said
    holding = instance.event_log_storage.get_concurrency_run_ids()
    if holding:  # a run that ended but still holds a slot (its process died before freeing it)
        infos = _pool_infos(instance)
        for record in instance.get_run_records(dg.RunsFilter(run_ids=sorted(holding), statuses=FINISHED_STATUSES)):
            run = record.dagster_run
            claimed, queued = held_by(infos, run.run_id)
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            what = released_what(claimed, queued)
            if what:
                said.append(f"an earlier run {run.run_id[:8]} ended ({run.status.value}) but still held {what}; "
                            "released")
    return said


def holders(instance: dg.DagsterInstance, pool: str, run_id: str) -> str:
    """Who keeps run `run_id` from a slot of `pool`, in words: the runs holding its slots (which step, for how long,
    whether their process is alive), else the steps queued before it."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    since = {(p.run_id, p.step_key): p.assigned_timestamp for p in info.pending_steps if p.assigned_timestamp}
    now = datetime.now(timezone.utc)
    parts = []
    for slot in info.claimed_slots:
        if slot.run_id == run_id:
            continue
        run = instance.get_run_by_id(slot.run_id)
        held = since.get((slot.run_id, slot.step_key))
        about = [slot.step_key] + ([f"for {duration((now - held).total_seconds())}"] if held else [])
        tags = run.tags if run else {}
        if PID_TAG in tags:
            where = "this host" if tags.get(HOST_TAG) == this_host() else f"host {tags.get(HOST_TAG)}"
            about.append(f"process {tags[PID_TAG]} on {where}" + ("" if process_gone(tags) else ", alive"))
        elif run is not None:
            about.append("launched outside ndx-pipeline run")
        parts.append(f"run {slot.run_id[:8]} holds {'it' if info.limit == 1 else 'a slot'} ({'; '.join(about)})")
    if not parts:
        ahead = sorted({p.run_id[:8] for p in info.pending_steps if p.run_id != run_id})
        parts.append(f"steps of run{'s' if len(ahead) > 1 else ''} {', '.join(ahead)} are queued before it"
                     if ahead else "no run holds it yet")
    limit = f"limit {info.limit}" if info.limit is not None else "no limit"
    return f"pool `{pool}` ({limit}): " + "; ".join(parts)


class PoolWaitExceeded(Exception):
    """A run waited longer for a pool slot than it was allowed to (`--wait`)."""


@dataclass
class _Wait:
    pool: str
    since: float
    next_line: float


class PoolWait(InstanceConcurrencyContext):
    """Dagster's instance concurrency context for one run executed in this process, waiting as this module says."""

    def __init__(self, instance: dg.DagsterInstance, dagster_run, say: Callable[[str], None],
                 wait_s: float | None = None):
        super().__init__(instance, dagster_run)
        self._run = dagster_run
        self._say, self._wait_s = say, wait_s
        self._waits: dict[str, _Wait] = {}

    def claim(self, concurrency_key: str, step_key: str, step_priority: int = 0) -> bool:
        if check_captured_interrupt():  # SIGTERM or Ctrl-C while waiting: stop here (__exit__ cancels the run)
            raise DagsterExecutionInterruptedError()
        if super().claim(concurrency_key, step_key, step_priority):
            wait = self._waits.pop(step_key, None)
            if wait is not None:
                self._tell(step_key, f"{step_key}: pool `{wait.pool}` slot taken after "
                                     f"{duration(time.monotonic() - wait.since)} of waiting")
            return True
        now = time.monotonic()
        wait = self._waits.setdefault(step_key, _Wait(concurrency_key, now, now))
        # check again within POLL_S, not after Dagster's back-off of up to 15 s
        self._pending_timeouts[step_key] = min(self._pending_timeouts[step_key], time.time() + POLL_S)
        if now < wait.next_line and (self._wait_s is None or now - wait.since < self._wait_s):
            return False
        released = release_stale_runs(self._instance)  # the holder may have been killed meanwhile
        for line in released:
            self._tell(step_key, line)
        if released:
            self._pending_timeouts[step_key] = 0.0
            if super().claim(concurrency_key, step_key, step_priority):
                self._waits.pop(step_key, None)
                return True
        waited = now - wait.since
        why = holders(self._instance, concurrency_key, self._run.run_id)
        if self._wait_s is not None and waited >= self._wait_s:
            raise PoolWaitExceeded(f"{step_key} of run {self._run.run_id[:8]} waited {duration(waited)} for a slot "
                                   f"(--wait {self._wait_s:g}) and gave up: {why}")
        self._tell(step_key, f"{step_key}: waiting {duration(waited)} for a slot of {why}")
        wait.next_line = now + WAIT_LINE_S
        return False

    def interval_to_next_pending_claim_check(self) -> float:
        """How long the executor sleeps before it asks again: until the next check is due, at most POLL_S."""
        if not self._pending_claims:
            return 0.0
        due = min((self._pending_timeouts.get(k, 0.0) for k in self._pending_claims), default=0.0)
        return min(POLL_S, max(0.0, due - time.time()))

    def _tell(self, step_key: str, line: str) -> None:
        self._say(line)
        self._instance.report_engine_event(line, self._run, step_key=step_key)

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        if exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, DagsterExecutionInterruptedError)):
            # stopped by SIGTERM or Ctrl-C: canceled (Dagster reads the status when the run ends), and its steps,
            # which ran in this process, hold nothing any more
            why = "stopped by SIGTERM or Ctrl-C"
            self._instance.add_run_tags(self._run.run_id, {INTERRUPTED_TAG: why})
            self._instance.report_run_canceling(self._run, message=f"{why}: canceling, its pool slots released")
            self._instance.event_log_storage.free_concurrency_slots_for_run(self._run.run_id)


@contextmanager
def waiting_on_pools(say: Callable[[str], None], wait_s: float | None = None) -> Iterator[None]:
    """Within: the runs this process executes in process wait for pool slots as `PoolWait` does. Dagster's in-process
    executor builds its concurrency context by this module-level name and offers no other way in."""
    from dagster._core.executor import in_process

    built_in = in_process.InstanceConcurrencyContext
    in_process.InstanceConcurrencyContext = lambda instance, run: PoolWait(instance, run, say, wait_s)
    try:
        yield
    finally:
        in_process.InstanceConcurrencyContext = built_in
