"""One writer per step and partition: two runs that materialize the same step on the same layer of a variant (two
CLIs, or the CLI and a sensor's run) take turns instead of interleaving their file writes.

A step holds an exclusive lock (`flock`) on `<storage>/.locks/<variant>/<step>/<layer>.lock` for each layer of its
run while it reads its inputs and writes its files. A second run's same step waits for it, saying once every
`notice_s` who holds the layer (the run, its process, since when), then runs on the files the first one left.
Different steps never wait for one another, so one run's steps still run side by side under a parallel executor.

The lock belongs to the open file: a process that dies (killed, out of memory) releases it with its descriptors, so
nothing stale is left to clear by hand. Layers are taken in ascending order, so two runs over overlapping ranges
cannot each hold a layer the other waits for.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

LOCKS_DIR = ".locks"
POLL_S = 0.25
NOTICE_S = 30.0


def lock_path(storage_dir: str | os.PathLike, variant: str, step: str, layer: int) -> Path:
    return Path(storage_dir) / LOCKS_DIR / variant / step / f"{int(layer)}.lock"


def holder_text(path: Path) -> str:
    """Who holds the lock at `path`, as its holder wrote it: 'run 1a2b3c4d (process 123 on host, since 10:02:11)'."""
    try:
        about = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        about = {}
    if not about:
        return "another run"
    since = time.strftime("%H:%M:%S", time.localtime(about.get("since", 0)))
    where = f"process {about.get('pid', '?')} on {about.get('host', '?')}"
    return f"run {about.get('run', '?')[:8]} ({where}, since {since})"


@contextmanager
def _one_layer(path: Path, holder: dict, say: Callable[[str], None], what: str, notice_s: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = last_notice = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if last_notice is None or now - last_notice >= notice_s:
                    started = started or now
                    waited = f" (waiting {now - started:.0f} s)" if now > started else ""
                    say(f"{what} is being written by {holder_text(path)}: this run waits for it{waited}")
                    last_notice = now
                time.sleep(POLL_S)
        if started is not None:
            say(f"{what}: the other run is done after {time.monotonic() - started:.0f} s; this run goes on")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # (still holding it) a released lock names nobody
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def partition_lock(storage_dir: str | os.PathLike, variant: str, step: str, layers: Iterable[int], run_id: str,
                   say: Callable[[str], None], notice_s: float = NOTICE_S) -> Iterator[None]:
    """Hold `step`'s write lock on each of `layers` of `variant` (ascending) for the body; wait while another run
    holds one, telling `say` who it is every `notice_s` seconds."""
    holder = {"run": run_id, "pid": os.getpid(), "host": os.uname().nodename, "since": time.time(), "step": step}
    with ExitStack() as held:
        for layer in sorted(set(int(x) for x in layers)):
            held.enter_context(_one_layer(lock_path(storage_dir, variant, step, layer), holder, say,
                                          f"layer {layer} of variant {variant} ({step})", notice_s))
        yield
