"""`dtype: auto` for an in-process LLM: the precision is chosen by measuring this machine, not by its CPU flags.

Which of bfloat16 and float32 runs the model faster depends on more than whether the CPU has bfloat16 instructions:
on a CPU with AMX bfloat16 wins by far; with AVX512-BF16 alone by less; on an AVX2 CPU torch computes bfloat16 in
its own slower kernels; and the instruction sets a process may use can be limited by the environment
(`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`, `MKL_ENABLE_INSTRUCTIONS`). So the first time a model is used on a
machine, each candidate precision computes the same small share of the pipeline's own work (a batch of simulated
excerpts after a shared head, and a batch of explanations' sampling steps: `LocalTransformersBackend.
calibration_seconds`), and the one that takes less time is used.

The choice and both timings are kept in one JSON file (`precision_cache_file`), under a key naming the machine (CPU
model, the instruction-set limits in the environment, torch's CPU capability and version, threads) and the model's
weights, so later runs read it instead of measuring. Processes that start together measure one at a time (a lock
on the file): the second reads what the first measured instead of timing the CPU while it is busy. It waits at most
LOCK_WAIT_S (a process stopped with Ctrl-Z in the middle of its calibration would otherwise hold every later run),
then measures for itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = ("bfloat16", "float32")
# How long a process waits for another's calibration before it measures for itself: the calibration takes 12-45 s on
# a 2-core CPU, so a holder still at it after this is stopped or stuck.
LOCK_WAIT_S = 300.0
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
CACHE_ENV = "NDX_PRECISION_CACHE"  # the file; default: $XDG_CACHE_HOME/ndx-pipeline/precision.json


@dataclass(frozen=True)
class PrecisionChoice:
    """What `dtype: auto` chose, and the seconds each candidate took for the calibration's work."""

    dtype: str
    seconds: dict[str, float]
    measured_on: str  # when (UTC, ISO 8601)
    machine: str  # the machine key's text
    just_measured: bool  # False: read from the cache file

    def line(self, model_name: str) -> str:
        timings = ", ".join(f"{d} {s:.1f} s" for d, s in sorted(self.seconds.items(), key=lambda kv: kv[1]))
        how = "measured now" if self.just_measured else f"measured {self.measured_on[:19]}Z, cached"
        return (f"precision auto → {self.dtype} for {model_name} on this machine ({how}; the calibration's work, "
                f"weighted as a default run's: {timings})")

    def metadata(self) -> dict:
        return {"llm_dtype_chosen_by": "measurement",
                **{f"llm_dtype_calibration_s_{d}": round(s, 3) for d, s in sorted(self.seconds.items())}}


def _cpuinfo(field: str) -> str | None:
    """The first `field` of /proc/cpuinfo (Linux), None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == field:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; else what platform says)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as Linux names them (avx2, avx512_bf16, amx_bf16 …); empty elsewhere."""
    return set((_cpuinfo("flags") or "").split())


def machine_key() -> dict:
    """What the relative speed of the precisions depends on, besides the model."""
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "limits": {name: os.environ[name] for name in ISA_LIMITS if os.environ.get(name)},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def precision_cache_file() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ndx-pipeline" / "precision.json"


def _entry_key(machine: dict, model: str) -> str:
    text = json.dumps({"machine": machine, "model": model}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or unreadable: measured again and rewritten


def _wait_for_lock(lock, model: str, log: Callable[[str], None] | None) -> None:
    """Take the calibration lock. Another process holding it (measuring now) is waited for, saying so, at most
    LOCK_WAIT_S; then this process goes on without it and measures for itself (the file is still replaced whole)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    said = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            if log:
                log(f"precision auto: the other process did not finish its timing of {model} in {LOCK_WAIT_S:.0f} s "
                    "(stopped or stuck?): measuring here instead")
            return
        if log and not said:
            log(f"precision auto: another process is timing {' and '.join(CANDIDATES)} for {model} on this "
                f"machine; waiting for its result (at most {LOCK_WAIT_S:.0f} s)")
            said = True
        time.sleep(0.2)


def choose_precision(model: str, seconds_for: Callable[[str], float], log: Callable[[str], None] | None = None,
                     path: Path | None = None, identity: str | None = None) -> PrecisionChoice:
    """The faster of CANDIDATES for `model` (its name; `identity`: its weights' files, when known) on this machine:
    read from the cache file, else `seconds_for(dtype)` for each candidate (the time of the same work in that
    precision) and stored."""
    path = path or precision_cache_file()
    machine = machine_key()
    key = _entry_key(machine, f"{model} {identity or ''}")
    machine_text = json.dumps(machine, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        _wait_for_lock(lock, model, log)  # one process measures; the others wait, then read its result
        entries = _read(path)
        entry = entries.get(key)
        if isinstance(entry, dict) and entry.get("dtype") in CANDIDATES:
            return PrecisionChoice(entry["dtype"], {d: float(s) for d, s in entry["seconds"].items()},
                                   entry["measured_on"], machine_text, just_measured=False)
        if log:
            log(f"precision auto: timing {' and '.join(CANDIDATES)} on this machine for {model} (once per machine "
                "and model)")
        seconds = {dtype: float(seconds_for(dtype)) for dtype in CANDIDATES}
        chosen = min(CANDIDATES, key=lambda d: seconds[d])
        measured_on = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        entries[key] = {"dtype": chosen, "seconds": seconds, "measured_on": measured_on, "machine": machine,
                        "model": model, "identity": identity}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(entries, out, indent=1, sort_keys=True)
        os.replace(tmp, path)
    return PrecisionChoice(chosen, seconds, measured_on, machine_text, just_measured=True)
