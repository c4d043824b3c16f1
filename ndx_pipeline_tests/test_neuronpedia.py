"""The Neuronpedia-shaped export and its import: every row valid against a JSON Schema of Neuronpedia's fields
(written here from its export script's rows, REFERENCE.md), batches of 1,024 rows ordered by index, an exact round
trip, and the output-side tokens computed from the weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal

from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    EXPLANATION_SCHEMA,
    EXPLANATIONS,
    OUTPUT_TOKENS,
    SCORES,
    TOP,
    usable,
)
from ndx_pipeline.core.storage import asset_path, write_parquet_atomic
from ndx_pipeline.reports import neuronpedia as np_export
from ndx_pipeline.reports.neuronpedia import export_neuronpedia, import_neuronpedia, read_batches, read_rows
from ndx_pipeline_tests.test_lineage import V, build_store

INDEX = {"type": "string", "pattern": "^[0-9]+$"}
NUMBERS = {"type": "array", "items": {"type": "number"}}
STRINGS = {"type": "array", "items": {"type": "string"}}


def _schema(required: dict, optional: dict | None = None) -> dict:
    return {"type": "object", "required": sorted(required), "additionalProperties": False,
            "properties": {**required, **(optional or {})}}


EXPLANATION = _schema({"id": {"type": "string"}, "modelId": {"type": "string"}, "layer": {"type": "string"},
                       "index": INDEX, "description": {"type": "string", "minLength": 1},
                       "explanationModelName": {"type": "string"}, "typeName": {"const": "oai_token-act-pair"},
                       "authorId": {"type": "string"}})
ACTIVATION = _schema({"id": {"type": "string"}, "modelId": {"type": "string"}, "layer": {"type": "string"},
                      "index": INDEX, "creatorId": {"type": "string"}, "dataSource": {"type": "string"},
                      "tokens": {**STRINGS, "minItems": 1}, "values": {**NUMBERS, "minItems": 1},
                      "maxValue": {"type": "number"}, "minValue": {"type": "number"},
                      "maxValueTokenIndex": {"type": "integer", "minimum": 0}})
FEATURE = _schema({"modelId": {"type": "string"}, "layer": {"type": "string"}, "index": INDEX,
                   "maxActApprox": {"type": "number"}, "frac_nonzero": {"type": "number", "minimum": 0, "maximum": 1},
                   "hookName": {"type": "string", "pattern": r"^blocks\.[0-9]+\."},
                   "pos_str": STRINGS, "pos_values": NUMBERS, "neg_str": STRINGS, "neg_values": NUMBERS})
SCORE = _schema({"id": {"type": "string"}, "explanationId": {"type": "string"}, "modelId": {"type": "string"},
                 "layer": {"type": "string"}, "index": INDEX, "value": {"type": "number"},
                 "explanationScoreTypeName": {"type": "string", "pattern": "^ndx_"},
                 "explanationScoreModelName": {"type": "string"},
                 "jsonDetails": {"type": "object", "required": ["variant", "explanation_id", "prompt_sha256",
                                                                "lineage"]}})
SCHEMAS = {"explanations": EXPLANATION, "activations": ACTIVATION, "features": FEATURE, "scores": SCORE}


def check_export(root: Path, storage: Path, variant: str) -> dict[str, dict[str, list]]:
    """Validate every row of a Neuronpedia export against its schema and the batch rules, check that the import
    gives back the stored records, explanations and output tokens exactly; the rows by source and kind."""
    rows: dict[str, dict[str, list]] = {}
    for source in sorted(p for p in root.iterdir() if p.is_dir()):
        layer = int(source.name.split("-")[0])
        rows[source.name] = {}
        for kind, schema in SCHEMAS.items():
            found = read_batches(source / kind)
            for row in found:
                jsonschema.validate(row, schema)
                assert row["layer"] == source.name and row["modelId"] == root.name
            indexes = [int(r["index"]) for r in found]
            assert indexes == sorted(indexes), f"{source.name}/{kind} is not ordered by index"
            rows[source.name][kind] = found
        model, about = read_rows(source / "model.jsonl"), read_rows(source / "source.jsonl")
        assert len(model) == 1 and model[0]["id"] == root.name
        assert len(about) == 1 and about[0]["id"] == source.name and about[0]["modelId"] == root.name
        # each activation row is one stored window of its unit: its values, max and argmax
        stored = pl.read_parquet(asset_path(storage, ACTIVATION_RECORDS, layer, variant))
        for a in rows[source.name]["activations"]:
            _, _, unit, kind, rank = a["id"].rsplit("/", 4)
            window = stored.filter((pl.col("neuron") == int(unit)) & (pl.col("kind") == kind)
                                   & (pl.col("rank") == int(rank))).row(0, named=True)
            assert a["tokens"] == window["tokens"]
            assert np.array_equal(np.float32(a["values"]), np.float32(window["activations"]))
            assert a["maxValue"] == pytest.approx(max(window["activations"]))
            assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
    back = import_neuronpedia(root)
    key = ["layer", "neuron", "kind", "rank"]
    for layer in back.layers():
        stored = pl.read_parquet(asset_path(storage, ACTIVATION_RECORDS, layer, variant))
        assert_frame_equal(back.records.filter(pl.col("layer") == layer).sort(key), stored.sort(key))
        explanations = asset_path(storage, EXPLANATIONS, layer, variant)
        if explanations.exists():
            kept = usable(pl.read_parquet(explanations)).select(EXPLANATION_SCHEMA.keys())
            assert_frame_equal(back.explanations.filter(pl.col("layer") == layer).sort("neuron"), kept.sort("neuron"))
        tokens = asset_path(storage, OUTPUT_TOKENS, layer, variant)
        if tokens.exists():
            assert_frame_equal(back.output_tokens.filter(pl.col("layer") == layer).sort("neuron"),
                               pl.read_parquet(tokens).sort("neuron"))
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("neuronpedia"))


def test_export_rows_follow_neuronpedia_and_come_back_exactly(store, tmp_path):
    runs = {0: {"scores": {"run_id": "run-a", "partition": f"0|{V}", "code_version": "cv", "data_version": "dv"}}}
    done = export_neuronpedia(store, tmp_path, model_id="tiny", variant=V, set_name="mlp", runs=runs,
                              about={"subject_model": "tiny-llama", "layers": 2})
    rows = check_export(tmp_path / "tiny", store, V)
    assert sorted(rows) == ["0-mlp", "1-mlp"] and sorted(done.sources) == ["0-mlp", "1-mlp"]
    explanations = pl.read_parquet(asset_path(store, EXPLANATIONS, 0, V))
    ok = explanations.filter(pl.col("status") == "ok")
    assert [r["description"] for r in rows["0-mlp"]["explanations"]] == ok.sort("neuron")["explanation"].to_list()
    # every score of an explanation, traced: ours and the lookup baseline, with the run and the prompt's hash
    scores = pl.read_parquet(asset_path(store, SCORES, 0, V)).sort("neuron")
    first = scores.row(0, named=True)
    mine = [r for r in rows["0-mlp"]["scores"] if r["explanationId"] == first["explanation_id"]]
    by_type = {r["explanationScoreTypeName"]: r for r in mine}
    assert by_type["ndx_simulation"]["value"] == pytest.approx(first["score"])
    assert by_type["ndx_baseline_lookup"]["value"] == pytest.approx(first["baseline_lookup"])
    details = by_type["ndx_simulation"]["jsonDetails"]
    assert details["lineage"]["scores"]["run_id"] == "run-a"
    assert details["prompt_sha256"] == ok.filter(pl.col("neuron") == first["neuron"])["prompt_sha256"][0]
    # the units' sides and moments survive only through the sidecar; a unit without one is rebuilt from values
    assert (tmp_path / "tiny" / "0-mlp" / "ndx" / "batch-0.jsonl.gz").exists()


def test_a_failing_schema_is_seen(store, tmp_path):
    """The schemas above can fail: a row lacking a field, or with an index that is not a string of digits."""
    export_neuronpedia(store, tmp_path, model_id="tiny", variant=V)
    row = read_batches(tmp_path / "tiny" / f"0-{V}" / "explanations")[0]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in row.items() if k != "description"}, EXPLANATION)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**row, "index": "-3"}, EXPLANATION)


def test_batches_hold_1024_rows_in_index_order(store, tmp_path, monkeypatch):
    """With batches of 5 rows (instead of 1,024) the activations spread over several files, each full but the last,
    read back in index order; a second export replaces the first one's batches."""
    monkeypatch.setattr(np_export, "BATCH_ROWS", 5)
    export_neuronpedia(store, tmp_path, model_id="tiny", variant=V, set_name="mlp")
    folder = tmp_path / "tiny" / "0-mlp" / "activations"
    sizes = [len(read_rows(folder / f"batch-{n}.jsonl.gz")) for n in range(len(list(folder.iterdir())))]
    assert len(sizes) > 2 and all(s == 5 for s in sizes[:-1]) and 0 < sizes[-1] <= 5
    monkeypatch.setattr(np_export, "BATCH_ROWS", 1024)
    export_neuronpedia(store, tmp_path, model_id="tiny", variant=V, set_name="mlp")
    assert sorted(p.name for p in folder.iterdir()) == ["batch-0.jsonl.gz"]
    assert np_export.BATCH_ROWS == 1024 and sum(sizes) == len(read_rows(folder / "batch-0.jsonl.gz"))


def test_negative_sides_get_their_own_source(store, tmp_path):
    """A neuron's negative side (unit id -1 - index) goes to `<layer>-<set>-neg` under its neuron's index, and
    comes back as the same unit id."""
    storage = tmp_path / "storage"
    records = pl.read_parquet(asset_path(store, ACTIVATION_RECORDS, 0, V))
    negative = records.with_columns((-1 - pl.col("neuron")).alias("neuron"), pl.lit(-1, pl.Int8).alias("polarity"))
    both = pl.concat([records, negative.cast(records.schema)])
    write_parquet_atomic(both, asset_path(storage, ACTIVATION_RECORDS, 0, "both"))
    export_neuronpedia(storage, tmp_path / "out", model_id="tiny", variant="both", set_name="mlp")
    negatives = read_batches(tmp_path / "out" / "tiny" / "0-mlp-neg" / "features")
    assert sorted(int(f["index"]) for f in negatives) == sorted(records["neuron"].unique().to_list())
    back = import_neuronpedia(tmp_path / "out")
    assert sorted(back.records["neuron"].unique().to_list()) == sorted(both["neuron"].unique().to_list())


def test_an_export_made_elsewhere_is_read_without_the_sidecar(store, tmp_path):
    """Neuronpedia's own rows alone (no ndx/ sidecar): each window is a unit's top record, ranked by its max, and
    the explanations come back by index."""
    export_neuronpedia(store, tmp_path, model_id="tiny", variant=V, set_name="mlp")
    for sidecar in tmp_path.rglob("ndx"):
        for f in sidecar.iterdir():
            f.unlink()
    back = import_neuronpedia(tmp_path / "tiny")
    stored = pl.read_parquet(asset_path(store, ACTIVATION_RECORDS, 0, V))
    layer0 = back.records.filter(pl.col("layer") == 0)
    windowed = stored.filter(pl.col("tokens").list.len() > 0)
    assert len(layer0) == len(windowed) and set(layer0["kind"]) == {TOP}
    for unit in layer0["neuron"].unique().to_list():
        maxima = layer0.filter(pl.col("neuron") == unit).sort("rank")["max_activation"].to_list()
        assert maxima == sorted(maxima, reverse=True)
    assert set(back.explanations["explanation"].to_list()) >= {
        e for e in pl.read_parquet(asset_path(store, EXPLANATIONS, 0, V))["explanation"].to_list() if e}


def test_bad_export_folder_says_what_is_wrong(tmp_path):
    from ndx_pipeline.core.errors import NdxInputError

    with pytest.raises(NdxInputError, match="holds no Neuronpedia source folder"):
        import_neuronpedia(tmp_path)
    (tmp_path / "m" / "six-mlp" / "features").mkdir(parents=True)
    with pytest.raises(NdxInputError, match="does not start with its layer"):
        import_neuronpedia(tmp_path)


# ------------------------------------------------------------------------------------------- output tokens


def test_output_tokens_of_the_bundled_model_are_its_unembedding_of_each_down_projection_column(subject):
    """On the bundled SmolLM2 (tied embeddings): promoted / suppressed tokens are the top and bottom logits of
    (down_proj column × final norm gain) through the model's own LM head; a negative side's lists are swapped."""
    from ndx_pipeline.core import stages
    from ndx_pipeline.core.data.subject_model import load_subject_model

    records = {1: pl.DataFrame({"neuron": [3, -5, 4], "unit_kind": ["mlp_neuron"] * 3, "unit_source": [None] * 3})}
    frame = stages.output_tokens(records, None)[1].sort("neuron")
    assert frame["neuron"].to_list() == [-5, 3, 4]
    model, tokenizer = load_subject_model(None, head=True)
    column = model.model.layers[1].mlp.down_proj.weight[:, 4].detach()
    with torch.no_grad():
        logits = model.lm_head(column * model.model.norm.weight)
    top = torch.topk(logits, 10)
    row = frame.filter(pl.col("neuron") == 4).row(0, named=True)
    assert row["promoted_tokens"] == [tokenizer.decode([int(i)]) for i in top.indices]
    assert np.allclose(row["promoted_logits"], top.values.numpy(), atol=1e-4)
    assert row["promoted_logits"] == sorted(row["promoted_logits"], reverse=True)
    negative = frame.filter(pl.col("neuron") == -5).row(0, named=True)  # neuron 4's negative side
    assert negative["promoted_tokens"] == row["suppressed_tokens"]
    assert np.allclose(negative["promoted_logits"], [-v for v in row["suppressed_logits"]], atol=1e-5)
    assert "norm" in row["direction"]


def test_output_tokens_on_gpt2_conv1d_and_a_dictionary_decoder(tmp_path):
    """GPT-2 stores its output projection transposed (Conv1D): the neuron's direction is its row there. A latent's
    direction is its decoder row; one written in the MLP's hidden units goes through the output projection."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from ndx_pipeline.core.data import output_tokens as ot
    from ndx_pipeline.core.data.dictionary_formats import decoder_rows

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=2, n_head=2, n_positions=16)).eval()
    projection = ot.output_projection(model, 1)
    assert projection.shape == (8, 32)
    assert torch.equal(ot.neuron_directions(model, 1, [5])[0], model.transformer.h[1].mlp.c_proj.weight[5])
    lens = ot.Unembedding.of(model)
    assert lens.norm == "ln_f" and lens.weight.shape == (50, 8)
    expected = (model.transformer.h[1].mlp.c_proj.weight[5] * model.transformer.ln_f.weight) @ model.lm_head.weight.T
    assert torch.allclose(lens.logits(ot.neuron_directions(model, 1, [5]))[0], expected.detach(), atol=1e-6)
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": 32, "d_sae": 4, "architecture": "standard"}))
    w_dec = torch.randn(4, 32)
    save_file({"W_enc": torch.randn(32, 4), "b_enc": torch.zeros(4), "W_dec": w_dec, "b_dec": torch.zeros(32)},
              str(folder / "sae_weights.safetensors"))
    rows = decoder_rows(folder, [2, 0])
    assert torch.equal(rows, w_dec[[2, 0]])
    through = ot.latent_directions(model, 1, rows)
    assert torch.allclose(through, rows @ projection.T, atol=1e-6)
    with pytest.raises(Exception, match="write neither"):
        ot.latent_directions(model, 1, torch.randn(1, 7))
    assert math.isfinite(float(lens.logits(through).sum()))


def test_viewer_page_and_lineage_show_what_a_unit_promotes_and_suppresses(store, tmp_path):
    """The output tokens computed on the bundled model for a stored layer: lineage's JSON carries them and the
    unit's viewer page lists them, promoted beside suppressed."""
    import shutil

    from ndx_pipeline.core import stages
    from ndx_pipeline.reports.lineage import lineage
    from ndx_pipeline.reports.viewer import write_viewer

    storage = tmp_path / "storage"
    shutil.copytree(store, storage)
    records = pl.read_parquet(asset_path(storage, ACTIVATION_RECORDS, 0, V))
    frame = stages.output_tokens({0: records}, None)[0]
    write_parquet_atomic(frame, asset_path(storage, OUTPUT_TOKENS, 0, V))
    unit = int(pl.read_parquet(asset_path(storage, SCORES, 0, V))["neuron"][0])
    found = lineage(storage, 0, unit, variant=V)["output_tokens"]
    row = frame.filter(pl.col("neuron") == unit).row(0, named=True)
    assert found["promoted_tokens"] == row["promoted_tokens"] and found["suppressed_tokens"] == row["suppressed_tokens"]
    write_viewer(storage, layers=[0], variant=V)
    page = (storage / "neuron_viewer" / V / "0" / f"{unit}.html").read_text()
    assert "Output tokens" in page and "promotes" in page and "suppresses" in page
    assert json.dumps(row["promoted_tokens"][0]).replace("<", "\\u003c") in page
    assert lineage(storage, 1, int(pl.read_parquet(asset_path(storage, SCORES, 1, V))["neuron"][0]),
                   variant=V)["output_tokens"] is None  # layer 1 has none: said as such


def test_lineage_verifies_a_prompt_that_listed_the_output_tokens():
    """An explanation written with `quality.explainer_logits` on: lineage rebuilds the prompt with the unit's
    output tokens listed and verifies its hash; without them the rebuilt prompt is not the one sent."""
    from ndx_pipeline.core.method.explainer import explainer_messages
    from ndx_pipeline.core.method.prompt_rebuild import rebuild_prompt
    from ndx_pipeline_tests.test_lineage import FIXTURE_EXPLAINER, sent_sha

    shown = [(["a", " b", " c"], [0.0, 2.0, 0.5])]
    output = ([" x", " y"], [" z"])
    chosen = {"explainer": FIXTURE_EXPLAINER, "prompt_sha256": sent_sha(explainer_messages(shown, output=output)),
              "excerpts_shown": 1, "prompt_fitted": None}
    found = rebuild_prompt(chosen, shown, output)
    assert found["verified"] and found["output_tokens_listed"] and found["digest"]
    assert 'Output makes more likely: "x", "y"' in found["messages"][-1]["content"]
    assert not rebuild_prompt(chosen, shown)["verified"]


def test_the_explanations_stage_lists_each_units_output_tokens_when_given():
    """stages.explanations with output_tokens (quality.explainer_logits): each unit's prompt lists its own
    promoted and suppressed tokens, every candidate's too; without them no prompt mentions output."""
    from ndx_pipeline.core import stages
    from ndx_pipeline.core.data.excerpts import split_excerpts
    from ndx_pipeline_tests.test_baselines import ScriptedBackend
    from ndx_pipeline_tests.test_excerpts import records

    recs = pl.concat([records(list(range(100, 120)), list(range(200, 220)), neuron=n) for n in (3, 5)])
    excerpts = split_excerpts(recs)
    tokens = pl.DataFrame({"layer": [0, 0], "neuron": [3, 5], "promoted_tokens": [[" up3"], [" up5"]],
                           "suppressed_tokens": [[" down3"], [" down5"]]})
    backend = ScriptedBackend()
    stages.explanations(excerpts, backend, candidates=1, output_tokens=tokens)
    last = {m[-1]["content"].split("\n")[0]: m[-1]["content"] for m in backend.messages}
    assert len(backend.messages) == 2
    for number, prompt in last.items():
        assert prompt.endswith(('Output makes more likely: "up3"\nOutput makes less likely: "down3"',
                                'Output makes more likely: "up5"\nOutput makes less likely: "down5"'))
    assert sum('"up3"' in m[-1]["content"] for m in backend.messages) == 1
    plain = ScriptedBackend()
    stages.explanations(excerpts, plain, candidates=1)
    assert not any("Output makes" in m["content"] or "output makes" in m["content"]
                   for messages in plain.messages for m in messages)
