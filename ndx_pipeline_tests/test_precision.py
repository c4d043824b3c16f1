"""`dtype: auto` (issue 35): the precision an in-process LLM computes in is the one measured faster on this machine,
measured once per machine and model and kept in a file (core/llm/precision.py).

`test_auto_is_the_faster_precision_measured_on_the_bundled_model` times the real calibration on the bundled model
(about 15 s here); the others check the choice and its file with given timings."""

from __future__ import annotations

import json

import pytest

from ndx_pipeline.core.llm.precision import CACHE_ENV, CANDIDATES, ISA_LIMITS, choose_precision, cpu_model


class Timings:
    """Seconds per precision, as a calibration would report them; counts how often each was asked for."""

    def __init__(self, **seconds: float):
        self.seconds, self.asked = seconds, []

    def __call__(self, dtype: str) -> float:
        self.asked.append(dtype)
        return self.seconds[dtype]


def test_the_faster_is_chosen_stored_and_read_back(tmp_path, monkeypatch):
    for name in ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "precision.json"
    timings, said = Timings(bfloat16=3.0, float32=1.5), []
    first = choose_precision("model-a", timings, said.append, path)
    assert (first.dtype, first.seconds, first.just_measured) == ("float32", {"bfloat16": 3.0, "float32": 1.5}, True)
    assert timings.asked == list(CANDIDATES) and said == ["precision auto: timing bfloat16 and float32 on this "
                                                          "machine for model-a (once per machine and model)"]
    assert first.line("m") == ("precision auto → float32 for m on this machine (measured now; the calibration's "
                               "work, weighted as a default run's: float32 1.5 s, bfloat16 3.0 s)")
    assert first.metadata() == {"llm_dtype_chosen_by": "measurement", "llm_dtype_calibration_s_bfloat16": 3.0,
                                "llm_dtype_calibration_s_float32": 1.5}
    (entry,) = json.loads(path.read_text()).values()
    assert entry["dtype"] == "float32" and entry["model"] == "model-a" and entry["machine"]["cpu"] == cpu_model()

    again = choose_precision("model-a", timings, said.append, path)  # read back: nothing timed, nothing said
    assert (again.dtype, again.seconds, again.just_measured) == ("float32", first.seconds, False)
    assert len(timings.asked) == 2 and len(said) == 1
    assert "cached" in again.line("m") and again.measured_on == first.measured_on

    other = choose_precision("model-b", Timings(bfloat16=1.0, float32=2.0), None, path)  # another model
    assert other.dtype == "bfloat16" and other.just_measured
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # another machine, as far as the kernels go
    limited = Timings(bfloat16=9.0, float32=2.0)
    assert choose_precision("model-b", limited, None, path).dtype == "float32" and limited.asked
    assert len(json.loads(path.read_text())) == 3  # each machine and model kept beside the others


def test_a_stopped_calibration_holds_others_only_so_long(tmp_path, monkeypatch):
    """Another process holds the calibration lock and never lets go (stopped mid-calibration): this one says it
    waits, waits LOCK_WAIT_S, says it gives up, measures, and stores its result."""
    import subprocess
    import sys
    import time

    from ndx_pipeline.core.llm import precision

    path = tmp_path / "precision.json"
    lock = path.with_name(path.name + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(precision, "LOCK_WAIT_S", 1.5)
        timings, said = Timings(bfloat16=1.0, float32=2.0), []
        started = time.monotonic()
        chosen = choose_precision("m", timings, said.append, path)
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert chosen.dtype == "bfloat16" and chosen.just_measured and timings.asked == list(CANDIDATES)
    assert waited >= 1.5
    assert said == ["precision auto: another process is timing bfloat16 and float32 for m on this machine; waiting "
                    "for its result (at most 2 s)",
                    "precision auto: the other process did not finish its timing of m in 2 s (stopped or stuck?): "
                    "measuring here instead",
                    "precision auto: timing bfloat16 and float32 on this machine for m (once per machine and model)"]
    assert json.loads(path.read_text())  # stored for the next run


def test_an_unreadable_file_is_measured_again(tmp_path):
    path = tmp_path / "precision.json"
    path.write_text("{not json")
    timings = Timings(bfloat16=1.0, float32=2.0)
    assert choose_precision("m", timings, None, path).dtype == "bfloat16" and timings.asked
    assert list(json.loads(path.read_text()).values())[0]["dtype"] == "bfloat16"


@pytest.mark.slow
def test_auto_is_the_faster_precision_measured_on_the_bundled_model(tmp_path, monkeypatch):
    import torch

    from ndx_pipeline.core.llm.local import LocalTransformersBackend

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "precision.json"))
    said: list[str] = []
    first = LocalTransformersBackend(dtype="auto")
    first.log = said.append
    chosen = first.dtype
    choice = first.precision
    assert choice.just_measured and set(choice.seconds) == set(CANDIDATES)
    assert all(s > 0 for s in choice.seconds.values()) and chosen == min(choice.seconds, key=choice.seconds.get)
    assert said == [f"precision auto: timing bfloat16 and float32 on this machine for {first.model_name} (once per "
                    "machine and model)", choice.line(first.model_name)]
    assert first._lm()[0].dtype == getattr(torch, chosen)  # the model computes in what was chosen

    second = LocalTransformersBackend(dtype="auto")
    second.log = said.append
    assert second.dtype == chosen and not second.precision.just_measured
    assert second.precision.seconds == choice.seconds and said[-1].endswith(
        "cached; the calibration's work, weighted as a default run's: "
        + ", ".join(f"{d} {s:.1f} s" for d, s in sorted(choice.seconds.items(), key=lambda kv: kv[1])) + ")")
    print(f"\n[precision auto] {choice.line(first.model_name)}")
