"""An LLM stage in which every unit failed stops its layer (an ERROR asset check), and the CLI says so in one
sentence with a non-zero exit; a partial failure only warns."""

import socket

import dagster as dg
import polars as pl
import pytest

from ndx_pipeline.cli import failure_message, run_warnings
from ndx_pipeline.core.contract import STATUS_FAILED, STATUS_OK
from ndx_pipeline.core.validation import ERROR, WARN, failure_share
from ndx_pipeline.definitions import build_definitions
from ndx_pipeline.defs.automation import MAIN_JOB
from ndx_pipeline_tests.runs import execute_layers


def test_failure_share_warns_then_errors():
    def frame(statuses):
        return pl.DataFrame({"status": statuses})

    assert failure_share(frame([STATUS_OK] * 4), "explanations").passed
    assert failure_share(frame([STATUS_OK] * 3 + [STATUS_FAILED]), "explanations").passed  # 25 %: not above
    warned = failure_share(frame([STATUS_OK] * 2 + [STATUS_FAILED] * 2), "explanations")
    assert not warned.passed and warned.severity == WARN and "2 of 4 explanations failed" in warned.description
    stopped = failure_share(frame([STATUS_FAILED] * 3), "explanations")
    assert not stopped.passed and stopped.severity == ERROR and stopped.description == \
        "every one of the 3 explanations failed"
    assert failure_share(frame([STATUS_FAILED] * 3), "baseline explanations", blocking=False).severity == WARN
    assert failure_share(frame([]), "explanations").passed


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.slow
def test_a_layer_whose_every_explanation_failed_stops_and_says_why(tmp_path):
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("assert", "break", "continue", "del", "pass", "global"):
        (corpus / f"{name}.txt").write_text(topics[name])
    down = {"backend": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1", "model": "nobody-home",
            "max_attempts": 1}
    config = {"resources": {
        "storage": {"config": {"storage_dir": str(tmp_path / "storage")}},
        "corpus_source": {"config": {"path": str(corpus)}},
        "subject_model": {"config": {"window_tokens": 16}},
        "selection": {"config": {"neurons": [5, 9], "score_top_excerpts": 2, "score_random_excerpts": 1}},
        "explainer_llm": {"config": down},
    }}
    job = build_definitions().resolve_job_def(MAIN_JOB)
    result = execute_layers(job, dg.DagsterInstance.ephemeral(), 0, run_config=config)
    assert not result.success
    checks = {(e.asset_check_evaluation_data.asset_check_key.name,
               e.asset_check_evaluation_data.asset_check_key.asset_key.to_user_string()):
              e.asset_check_evaluation_data for e in result.all_events
              if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION}
    stopped = checks[("failure_share", "explanations")]
    assert not stopped.passed and stopped.severity == dg.AssetCheckSeverity.ERROR
    assert "every one of the 2 explanations failed" in stopped.description
    # the token-list baseline's explanations failed too (same server): a warning, not the reason the layer stopped
    assert checks[("failure_share", "baseline_explanations")].severity == dg.AssetCheckSeverity.WARN
    message = failure_message(result)
    assert "explanations" in message and "every one of the 2 explanations failed" in message, message
    assert "\n" not in message
    assert not any(e.is_step_success and e.step_key == "simulations" for e in result.all_events)
    assert stopped.metadata["failed_layers"].value == "0"  # which layers it stopped (the CLI goes on with others)
    assert stopped.metadata["layer_0_stopped_by"].value == "every one of the 2 explanations failed"
    assert any("baseline_explanations" in w for w in run_warnings(result))
