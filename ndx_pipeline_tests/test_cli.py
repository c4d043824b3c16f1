"""The command line: clear errors for bad input before anything runs, and the layer-range logic."""

import os
import subprocess
import sys
from pathlib import Path

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


def _corpus(tmp_path, kind: str) -> str:
    """A bad corpus of one kind, written under tmp_path."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    if kind == "missing":
        return str(tmp_path / "nowhere")
    if kind == "latin-1":
        (folder / "a.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    elif kind == "jsonl without text":
        (folder / "c.jsonl").write_text('{"body": "no text field"}\n')
        return str(folder / "c.jsonl")
    elif kind == "broken jsonl":
        (folder / "c.jsonl").write_text('{"text": "fine"}\n{"text": \n')
        return str(folder / "c.jsonl")
    return str(folder)  # "empty": a folder with no text files


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"), ("empty", "holds no .txt or .md files"), ("latin-1", "is not UTF-8"),
    ("jsonl without text", "text"), ("broken jsonl", "JSON"),
])
def test_a_bad_corpus_is_one_sentence_and_nothing_else(kind, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["run", "--layers", "0", "--corpus", _corpus(tmp_path, kind)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_core_imports_no_dagster():
    code = ("import sys; import ndx_pipeline.core.data.forward_pass, ndx_pipeline.core.data.record_frames, "
            "ndx_pipeline.core.llm.backend, ndx_pipeline.core.method.scoring, ndx_pipeline.core.method.explainer, "
            "ndx_pipeline.core.data.excerpts, ndx_pipeline.core.data.corpus; "
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
    assert index.endswith("index.html") and (storage / "neuron_viewer" / "neurons" / "0" / f"{neuron}.html").exists()


def test_export_then_import_commands_record_materializations(tmp_path, monkeypatch, capsys):
    import dagster as dg
    import polars as pl

    from ndx_pipeline.core.storage import asset_path
    from ndx_pipeline.defs.metadata import content_hash
    from ndx_pipeline_tests.test_lineage import build_store

    storage, out, fresh = build_store(tmp_path), tmp_path / "export", tmp_path / "fresh"
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["export", str(out), "--layers", "0", "--storage", str(storage)]) == 0
    assert "layer 0:" in capsys.readouterr().out
    records = sorted((out / "collated-activations" / "0").glob("*.json"))
    assert records and all(p.stem.isdigit() for p in records)

    assert main(["import", str(out), "--storage", str(fresh)]) == 0
    printed = capsys.readouterr().out
    assert "Next: ndx-pipeline run --variant imported --layers 0 --from top_excerpts" in printed
    back = pl.read_parquet(asset_path(fresh, "activation_records", 0, "imported"))
    assert back.select("neuron", "kind", "rank", "tokens").sort(["neuron", "kind", "rank"]).equals(
        pl.read_parquet(asset_path(storage, "activation_records", 0, "neurons")).select("neuron", "kind", "rank",
                                                                                       "tokens")
        .sort(["neuron", "kind", "rank"]))
    # released records count no tokens
    assert pl.read_parquet(asset_path(fresh, "token_table", 0, "imported")).is_empty()
    with dg.DagsterInstance.get() as instance:  # the CLI's instance: the files are materializations of their assets
        assert instance.has_dynamic_partition("variant", "imported")
        for asset in ("activation_records", "token_table"):
            event = instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization
            assert event.partition == "0|imported" and "imported from" in event.description
            assert event.tags["dagster/data_version"] == content_hash([asset_path(fresh, asset, 0, "imported")])


def test_run_from_an_asset_that_does_not_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["run", "--layers", "0", "--from", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--from 'nope' is not an asset" in err and "top_excerpts" in err and err.count("\n") == 1


def test_dg_check_defs_passes():
    """The defs folder loads the way `dg` projects load it ([tool.dg] in pyproject.toml)."""
    repo = Path(__file__).resolve().parents[1]
    dg_cli = Path(sys.executable).parent / "dg"
    env = {**os.environ, "VIRTUAL_ENV": str(Path(sys.executable).parent.parent)}
    done = subprocess.run([str(dg_cli), "check", "defs", "--use-active-venv"], cwd=repo, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All definitions loaded successfully" in done.stdout + done.stderr


def test_unit_choices_reach_the_selection_resource(tmp_path):
    from ndx_pipeline.cli import parser, run_config

    config = run_config(parser().parse_args(["run", "--units", "both"]))
    assert config["resources"]["selection"]["config"] == {"units": "both"}
    config = run_config(parser().parse_args(["run", "--dictionary", str(tmp_path), "--dictionary-hook", "mlp_out",
                                             "--neurons-per-layer", "-1"]))
    assert config["resources"]["selection"]["config"] == {"units": "dictionary", "dictionary": str(tmp_path),
                                                          "dictionary_hook": "mlp_out", "neurons_per_layer": -1}
    assert parser().parse_args(["lineage", "3", "-6"]).neuron == -6
    config = run_config(parser().parse_args(["run", "--llm-dtype", "float32"]))
    assert all(config["resources"][llm]["config"] == {"dtype": "float32"}
               for llm in ("explainer_llm", "simulator_llm", "scorer_llm"))
    assert parser().parse_args(["lineage", "3", "5", "--negative"]).negative


def test_commands_find_the_files_where_the_pipeline_wrote_them(tmp_path, monkeypatch):
    """--storage, else NDX_STORAGE (where the pipeline's resources write when the run config says nothing), else
    $DAGSTER_HOME/storage: the summary after `run`, lineage, viewer and export read where the run wrote."""
    from ndx_pipeline.cli import _storage, parser

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NDX_STORAGE", raising=False)
    assert _storage(parser().parse_args(["run"])) == tmp_path / "home" / "storage"
    monkeypatch.setenv("NDX_STORAGE", str(tmp_path / "elsewhere"))
    assert _storage(parser().parse_args(["run"])) == tmp_path / "elsewhere"
    assert _storage(parser().parse_args(["view", "--storage", str(tmp_path / "given")])) == tmp_path / "given"
