"""Two runs on one partition take turns (issue 32, item 7): the second run's step waits while another process holds
that step's lock on the layer, says who it waits for, and writes after it; a killed holder leaves no lock behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from ndx_pipeline.core.partition_lock import lock_path, partition_lock
from ndx_pipeline.core.storage import asset_path
from ndx_pipeline.definitions import build_definitions
from ndx_pipeline.defs.automation import MAIN_JOB
from ndx_pipeline_tests.runs import execute_layers

REPO = Path(__file__).resolve().parents[1]
# Another run's step, in its own process: it holds the lock of `step` on layers 0 and 1 of `variant`, says so, and
# lets go when its stdin closes (or when it is killed).
HOLDER = """
import sys
from ndx_pipeline.core.partition_lock import partition_lock
storage, variant, step = sys.argv[1:4]
with partition_lock(storage, variant, step, [1, 0], "feedface-0000-run", print):
    print("holding", flush=True)
    sys.stdin.read()
"""


def holder(storage: Path, variant: str, step: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(storage), variant, step], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO),
                                                                                       os.environ.get("PYTHONPATH"))))})
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_writer_waits_for_the_first_and_a_dead_one_holds_nothing(tmp_path):
    proc = holder(tmp_path, "neurons", "explanations")
    said: list[str] = []
    try:
        released_at = None

        def say(line: str) -> None:
            nonlocal released_at
            said.append(line)
            if len(said) == 2:  # told twice that it waits: now the other run finishes
                released_at = time.monotonic()
                proc.stdin.close()

        with partition_lock(tmp_path, "neurons", "explanations", [0], "cafe0000-run", say, notice_s=0.5):
            entered = time.monotonic()
            assert '"run": "cafe0000-run"' in lock_path(tmp_path, "neurons", "explanations", 0).read_text()
        assert released_at is not None and entered >= released_at
        assert said[0].startswith("layer 0 of variant neurons (explanations) is being written by run feedface "
                                  f"(process {proc.pid} on ")
        assert said[0].endswith(": this run waits for it")
        assert "(waiting " in said[1] and len(said) == 3
        assert said[2].startswith("layer 0 of variant neurons (explanations): the other run is done after ")
        assert said[2].endswith(" s; this run goes on")
        assert lock_path(tmp_path, "neurons", "explanations", 0).read_text() == ""  # released: names nobody
    finally:
        proc.kill()
        proc.wait(30)

    # another step, another variant or another layer: no wait at all
    proc = holder(tmp_path, "neurons", "explanations")
    try:
        for variant, step, layer in (("neurons", "simulations", 0), ("other", "explanations", 0),
                                     ("neurons", "explanations", 2)):
            with partition_lock(tmp_path, variant, step, [layer], "cafe0000-run", said.append):
                pass
        assert len(said) == 3
        # a holder killed with SIGKILL (no cleanup ran) leaves the layer free at once
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        waited: list[str] = []
        with partition_lock(tmp_path, "neurons", "explanations", [0, 1], "cafe0000-run", waited.append):
            pass
        assert waited == []
    finally:
        proc.kill()
        proc.wait(30)


@pytest.mark.slow
def test_a_run_waits_for_another_runs_step_on_its_layer(tmp_path, monkeypatch):
    """The CLI and a sensor's run, or two CLIs: here another process holds the extraction step's lock on layer 0 of
    the variant. The run's step says who it waits for in its log, and writes its files only after the other let go."""
    monkeypatch.setenv("NDX_STORAGE", str(tmp_path / "storage"))
    monkeypatch.setenv("NDX_NEURONS_PER_LAYER", "2")
    for var in ("NDX_SIMULATOR_MODEL", "NDX_EXPLAINER_MODEL", "NDX_CORPUS", "NDX_SUBJECT_MODEL"):
        monkeypatch.delenv(var, raising=False)
    defs = build_definitions()
    step = defs.resolve_assets_def("activation_records").op.name
    proc = holder(tmp_path / "storage", "neurons", step)
    released = {}

    def release_later():  # the other run's step ends a few seconds into this run
        time.sleep(4)
        released["at"] = time.time()
        proc.stdin.close()

    threading.Thread(target=release_later, daemon=True).start()
    try:
        with dg.instance_for_test() as instance:
            result = execute_layers(defs.resolve_job_def(MAIN_JOB), instance, 0, variant="neurons",
                                    asset_selection=[dg.AssetKey("corpus"), dg.AssetKey("activation_records")])
            assert result.success
            said = [e.user_message for e in instance.all_logs(result.run_id)]
        waits = [m for m in said if "is being written by run feedface" in m]
        assert waits and waits[0].startswith(f"layer 0 of variant neurons ({step}) is being written by run feedface "
                                             f"(process {proc.pid} on ")
        assert any(m.startswith(f"layer 0 of variant neurons ({step}): the other run is done after ") for m in said)
        written = asset_path(tmp_path / "storage", "activation_records", 0, "neurons").stat().st_mtime
        assert written >= released["at"]
    finally:
        proc.kill()
        proc.wait(30)
