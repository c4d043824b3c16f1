"""The command line: clear errors for bad input before anything runs, and the layer-range logic."""

import subprocess
import sys

import pytest

from ndx_pipeline.cli import main, parse_layers
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.defs.partitions import contiguous_ranges


def test_layers_parse_and_group_into_runs():
    assert parse_layers("0-2, 5,4") == [0, 1, 2, 4, 5]
    assert contiguous_ranges([0, 1, 2, 4, 5, 9]) == [(0, 2), (4, 5), (9, 9)]
    with pytest.raises(NdxInputError, match="'x' is not a layer number"):
        parse_layers("1,x")


@pytest.mark.parametrize("argv, message", [
    (["run", "--layers", "30"], "layer 30 is outside the model 'bundled:SmolLM2-135M-Instruct', which has layers 0..29"),
    (["run", "--layers", "0", "--model", "no-such-org/no-such-model"], "model 'no-such-org/no-such-model' could not be found locally"),
    (["run", "--layers", "0", "--model", "/nowhere/model.gguf"], "model file /nowhere/model.gguf does not exist"),
    (["run", "--layers", ","], "names no layer"),
])
def test_bad_input_is_one_clear_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NDX_SUBJECT_MODEL", "")  # restored after the test: the CLI sets it for --model
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "home" / "storage").exists()


def test_core_imports_no_dagster():
    code = ("import sys; import ndx_pipeline.core.data.activations, ndx_pipeline.core.llm.backend, ndx_pipeline.core.method.scoring, "
            "ndx_pipeline.core.method.explainer, ndx_pipeline.core.data.excerpts, ndx_pipeline.core.data.corpus; "
            "print('dagster' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lineage_and_view_commands(tmp_path, monkeypatch, capsys):
    import json

    from ndx_pipeline_tests.test_lineage import NEURONS, build_store

    storage = build_store(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    layer, neuron = 0, sorted(NEURONS[0])[0]
    assert main(["lineage", str(layer), str(neuron), "--json", "--storage", str(storage)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["excerpts"] and all({"doc_id", "char_start", "char_end", "text"} <= set(e) for e in out["excerpts"])
    assert main(["lineage", str(layer), "99999", "--storage", str(storage)]) == 2
    assert "no score for neuron 99999" in capsys.readouterr().err
    assert main(["view", "--storage", str(storage)]) == 0
    index = capsys.readouterr().out.strip().splitlines()[-1]
    assert index.endswith("index.html") and (storage / "neuron_viewer" / "0" / f"{neuron}.html").exists()
