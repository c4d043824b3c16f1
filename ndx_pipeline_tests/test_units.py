"""Units beyond positive neurons, on the real bundled model: a neuron's negative side (its most negative windows,
stored negated) and both sides as two units kept apart; dictionary latents read from SAELens and sparsify folders
written here (ReLU, JumpReLU, TopK, a TopK transcoder) equal an independent `encode(h)` of activations captured by the
test's own hooks; a latent that never fires is recorded as dead and never reaches the explainer."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from ndx_pipeline.core import stages
from ndx_pipeline.core.contract import DEAD, DICTIONARY_LATENT, MLP_NEURON, RECORD_SCHEMA, negative_id, unit_label
from ndx_pipeline.core.data import forward_pass, record_frames
from ndx_pipeline.core.data.dictionaries import load_dictionary
from ndx_pipeline.core.data.units import DictionaryLatents, MlpNeurons, dictionaries_by_layer
from ndx_pipeline.core.data.windows import TokenTexts
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.models import special_token_wrap
from ndx_pipeline.core.storage import write_parquet_atomic
from ndx_pipeline_tests.test_activations import hooked_pass

TOP_K, RANDOM_K = 8, 6
TOL = dict(rtol=1e-4, atol=1e-4)
# Latents read the residual stream, whose norm reaches ~300 on this model: a window run alone and the same window in a
# padded batch differ there by ~1e-6 of that in float32, ~1e-3 after projection onto a latent direction.
LATENT_TOL = dict(rtol=1e-4, atol=2e-3)


def captured(model, tokenizer, windows, modules: dict):
    """{name: [per window: [tokens, width]]}: the input ("in") or output ("out") of named modules, one window at a
    time, by hooks this test registers itself (each pass stopped once every named module has been seen)."""
    prefix, suffix = special_token_wrap(tokenizer)
    out = {name: [] for name in modules}
    for w in range(len(windows)):
        ids = windows.ids[w, : windows.length[w]].tolist()
        seen = hooked_pass(model, torch.tensor([prefix + ids + suffix]), modules)
        for name, x in seen.items():
            out[name].append(x[0, len(prefix) : len(prefix) + len(ids)].float().numpy())
    return out


def check_selection(sel, per_window: list[np.ndarray], tol=TOL):
    """The kept top windows are a brute force's top windows over `per_window` ([tokens, units] each; windows whose
    maxima tie within float noise may swap) among those where the unit fired (max > 0), and hold exactly those
    windows' activations; slots left over stay empty."""
    for i in range(per_window[0].shape[1]):
        maxima = np.array([a[:, i].max() for a in per_window])
        kept = [w for w in sel.top_window[i].tolist() if w >= 0]
        n_kept = len(kept)
        fired = np.sort(maxima[maxima > 0])[::-1]
        # a window at the edge of firing (|max| within float noise of 0) may count on either side
        assert min(int((maxima > tol["atol"]).sum()), TOP_K) <= n_kept <= min(len(fired), TOP_K)
        np.testing.assert_allclose(sel.top_max[i, :n_kept].numpy(), fired[:n_kept], **tol)
        assert len(set(kept)) == n_kept and (sel.top_window[i, n_kept:] == -1).all()
        others = np.delete(maxima, kept)
        weakest = sel.top_max[i, n_kept - 1].item() if n_kept == TOP_K else 0.0
        assert others.max() <= weakest + tol["atol"] + tol["rtol"] * abs(weakest)
        for rank, w in enumerate(kept):
            n = len(per_window[w])
            assert maxima[w] == pytest.approx(sel.top_max[i, rank].item(), rel=tol["rtol"], abs=tol["atol"])
            np.testing.assert_allclose(sel.top_acts[i, rank, :n].numpy(), per_window[w][:, i], **tol)


# ------------------------------------------------------------------------------------------------ neuron polarity

NEURONS = [3, 250, 1000]


@pytest.fixture(scope="module")
def hidden(subject, small_windows):
    model, tok = subject
    return captured(model, tok, small_windows, {layer: (model.layers[layer].mlp.down_proj, "in") for layer in (0, 2)})


@pytest.fixture(scope="module")
def sided(subject, small_windows):
    model, tok = subject
    units = {0: MlpNeurons(0, NEURONS, "negative"), 2: MlpNeurons(2, NEURONS, "both")}
    selections, _ = forward_pass.extract(model, tok, small_windows, units, top_k=TOP_K, random_k=RANDOM_K, seed=3,
                                         batch_size=7)
    return units, selections


def test_negative_side_keeps_the_most_negative_windows_negated(sided, hidden):
    units, selections = sided
    assert units[0].ids == [negative_id(n) for n in NEURONS] == [-4, -251, -1001]
    check_selection(selections[0], [-a[:, NEURONS] for a in hidden[0]])
    mean, _, mx = selections[0].moments()
    every = np.concatenate(hidden[0])[:, NEURONS].astype(np.float64)
    np.testing.assert_allclose(mx, -every.min(axis=0), **TOL)
    np.testing.assert_allclose(mean, -every.mean(axis=0), rtol=1e-4, atol=1e-6)


def assert_stored_as_contract(records: pl.DataFrame, tmp_path):
    """The records file holds the contract's columns and types, and the rows built (token texts held as codes)."""
    path = write_parquet_atomic(records, tmp_path / "records.parquet")
    stored = pl.read_parquet(path)
    assert stored.schema == pl.Schema(RECORD_SCHEMA)
    assert stored.equals(records.with_columns(pl.col("tokens").cast(pl.List(pl.String))))


def test_both_sides_are_two_units_kept_apart(sided, hidden, small_windows, subject, tmp_path):
    units, selections = sided
    assert units[2].ids == [3, 250, 1000, -4, -251, -1001]
    check_selection(selections[2], [np.concatenate([a[:, NEURONS], -a[:, NEURONS]], axis=1) for a in hidden[2]])
    records = record_frames.records_frame(2, selections[2], small_windows, TokenTexts(subject[1]), units[2])
    assert_stored_as_contract(records, tmp_path)
    by_unit = records.group_by("neuron").agg(pl.col("polarity").unique(), pl.col("unit_index").unique(),
                                             pl.col("unit_kind").unique(), pl.len())
    got = {r["neuron"]: (r["polarity"], r["unit_index"], r["unit_kind"], r["len"]) for r in by_unit.to_dicts()}
    for n in NEURONS:
        assert got[n] == ([1], [n], [MLP_NEURON], TOP_K + RANDOM_K)
        assert got[negative_id(n)] == ([-1], [n], [MLP_NEURON], TOP_K + RANDOM_K)
    # a random window holds the neuron's values on the positive unit and their negation on the negative one
    pos = records.filter((pl.col("neuron") == 250) & (pl.col("kind") == "random")).sort("rank")
    neg = records.filter((pl.col("neuron") == -251) & (pl.col("kind") == "random")).sort("rank")
    for a, b in zip(pos["activations"].to_list(), neg["activations"].to_list()):
        np.testing.assert_array_equal(np.array(a), -np.array(b))
    # excerpts per unit: each side gets its own disjoint splits
    excerpts = stages.top_excerpts(records, explain=1, score_top=1, score_random=1)
    assert sorted(excerpts["neuron"].unique().to_list()) == sorted(units[2].ids)
    assert unit_label(-251) == "neuron 250 (negative)" and unit_label(250) == "neuron 250"


# ------------------------------------------------------------------------------------------------ dictionaries

LATENTS = 12
LAYER_OF = {"relu": 1, "jumprelu": 2, "topk": 3, "sparsify_sae": 4, "sparsify_transcoder": 5}


def saelens_folder(root, name, architecture, W, b_enc, b_dec, hook_name, threshold=None, k=None):
    folder = root / name
    folder.mkdir()
    tensors = {"W_enc": W, "b_enc": b_enc, "b_dec": b_dec, "W_dec": np.ascontiguousarray(W.T)}
    if threshold is not None:
        tensors["threshold"] = threshold
    save_file({key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in tensors.items()},
              str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": architecture, "d_in": W.shape[0], "d_sae": W.shape[1], "hook_name": hook_name,
           "apply_b_dec_to_input": True, "normalize_activations": "none"}
    if k:
        cfg["k"] = k
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def sparsify_folder(root, hookpoint, W, b_enc, b_dec, k, transcode):
    folder = root / hookpoint
    folder.mkdir()
    save_file({"encoder.weight": torch.from_numpy(np.ascontiguousarray(W.T)), "encoder.bias": torch.from_numpy(b_enc),
               "W_dec": torch.from_numpy(W.T.copy()), "b_dec": torch.from_numpy(b_dec)},
              str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"num_latents": W.shape[1], "k": k, "d_in": W.shape[0],
                                                 "transcode": transcode, "expansion_factor": 0,
                                                 "normalize_decoder": True, "multi_topk": False,
                                                 "skip_connection": False}))
    return folder


def directions(per_window, seed):
    """Latent directions chosen from the model's own activations (unit vectors of seeded token positions), a bias
    that lets each fire on its ~3 % most aligned tokens, and an input offset: weights made by the test."""
    every = np.concatenate(per_window)
    rng = np.random.default_rng(seed)
    picks = every[rng.choice(len(every), LATENTS, replace=False)]
    W = (picks / np.linalg.norm(picks, axis=1, keepdims=True)).T.astype(np.float32)  # [d, n]
    b_dec = (every.mean(axis=0) * 0.5).astype(np.float32)
    pre = (every - b_dec) @ W
    b_enc = (-np.quantile(pre, 0.97, axis=0)).astype(np.float32)
    b_enc[-1] = -1e6  # the last latent never fires: recorded dead
    return W, b_enc, b_dec


def encoded(h, W, b_enc, b_dec, architecture, threshold=None, k=None):
    """An independent encode(h) in numpy, per architecture."""
    pre = (h.astype(np.float64) - b_dec) @ W + b_enc
    if architecture == "relu":
        return np.maximum(pre, 0)
    if architecture == "jumprelu":
        return np.where(pre > threshold, np.maximum(pre, 0), 0)
    keep = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, keep, np.maximum(np.take_along_axis(pre, keep, axis=1), 0), axis=1)
    return out


@pytest.fixture(scope="module")
def dictionary_run(subject, small_windows, tmp_path_factory):
    model, tok = subject
    L = LAYER_OF
    h = captured(model, tok, small_windows, {
        "resid_post_1": (model.layers[L["relu"]], "out"),
        "mlp_out_2": (model.layers[L["jumprelu"]].mlp, "out"),
        "resid_pre_3": (model.layers[L["topk"]], "in"),
        "resid_post_4": (model.layers[L["sparsify_sae"]], "out"),
        "mlp_in_5": (model.layers[L["sparsify_transcoder"]].mlp, "in"),
    })
    root = tmp_path_factory.mktemp("dictionaries")
    made = {}
    W, b, d = directions(h["resid_post_1"], 1)
    made["relu"] = (saelens_folder(root, "relu", "standard", W, b, d, "blocks.1.hook_resid_post"),
                    h["resid_post_1"], dict(W=W, b_enc=b, b_dec=d, architecture="relu"))
    W, b, d = directions(h["mlp_out_2"], 2)
    threshold = np.full(LATENTS, 0.05, dtype=np.float32)
    made["jumprelu"] = (saelens_folder(root, "jumprelu", "jumprelu", W, b, d, "blocks.2.hook_mlp_out", threshold),
                        h["mlp_out_2"], dict(W=W, b_enc=b, b_dec=d, architecture="jumprelu", threshold=threshold))
    W, b, d = directions(h["resid_pre_3"], 3)
    b[:-1] += 0.5  # TopK does the choosing: most latents are positive, 3 are kept per token
    made["topk"] = (saelens_folder(root, "topk", "topk", W, b, d, "blocks.3.hook_resid_pre", k=3),
                    h["resid_pre_3"], dict(W=W, b_enc=b, b_dec=d, architecture="topk", k=3))
    W, b, d = directions(h["resid_post_4"], 4)
    (root / "sparsify").mkdir()
    made["sparsify_sae"] = (sparsify_folder(root / "sparsify", "layers.4", W, b, d, 4, False),
                            h["resid_post_4"], dict(W=W, b_enc=b, b_dec=d, architecture="topk", k=4))
    W, b, _ = directions(h["mlp_in_5"], 5)
    zero = np.zeros(W.shape[0], dtype=np.float32)
    made["sparsify_transcoder"] = (sparsify_folder(root / "sparsify", "layers.5.mlp", W, b, zero, 2, True),
                                   h["mlp_in_5"], dict(W=W, b_enc=b, b_dec=zero, architecture="topk", k=2))
    latents = list(range(LATENTS))
    units = {L[name]: DictionaryLatents(L[name], load_dictionary(folder), latents)
             for name, (folder, _, _) in made.items()}
    selections, _ = forward_pass.extract(model, tok, small_windows, units, top_k=TOP_K, random_k=RANDOM_K, seed=3,
                                         batch_size=7)
    return made, units, selections, root


@pytest.mark.parametrize("name", list(LAYER_OF))
def test_latents_equal_an_independent_encoding(dictionary_run, name):
    made, units, selections, _ = dictionary_run
    folder, per_window, spec = made[name]
    unit_set = units[LAYER_OF[name]]
    assert unit_set.dictionary.layer == LAYER_OF[name]
    latent_acts = [encoded(a, spec["W"], spec["b_enc"], spec["b_dec"], spec["architecture"], spec.get("threshold"),
                           spec.get("k")) for a in per_window]
    live = [i for i in range(LATENTS) if max(a[:, i].max() for a in latent_acts) > 0]
    assert LATENTS - 1 not in live and len(live) >= LATENTS // 2
    sel = selections[LAYER_OF[name]]
    check_selection(sel, latent_acts, LATENT_TOL)
    np.testing.assert_allclose(sel.moments()[2], np.concatenate(latent_acts).max(axis=0), **LATENT_TOL)


def test_dictionary_records_name_their_units_and_skip_the_dead(dictionary_run, small_windows, subject, tmp_path):
    _, units, selections, _ = dictionary_run
    layer = LAYER_OF["sparsify_transcoder"]
    records = record_frames.records_frame(layer, selections[layer], small_windows, TokenTexts(subject[1]), units[layer])
    assert_stored_as_contract(records, tmp_path)
    assert set(records["unit_kind"].unique()) == {DICTIONARY_LATENT}
    assert set(records["polarity"].unique()) == {1}
    source = records["unit_source"][0]
    assert "sparsify" in source and "transcoder" in source and "mlp_in" in source and "layers.5.mlp" in source
    dead = records.filter(pl.col("kind") == DEAD)
    assert dead["neuron"].to_list() == [LATENTS - 1] and dead["window_index"].to_list() == [None]
    assert records.filter(pl.col("neuron") == LATENTS - 1).height == 1
    excerpts = stages.top_excerpts(records, explain=1, score_top=1, score_random=1)
    assert LATENTS - 1 not in excerpts["neuron"].to_list()
    assert excerpts["neuron"].n_unique() == records.filter(pl.col("kind") != DEAD)["neuron"].n_unique()


def test_a_folder_of_dictionaries_serves_each_layer(dictionary_run):
    _, _, _, root = dictionary_run
    found = dictionaries_by_layer(root / "sparsify", None, [4, 5])
    assert {layer: d.hook for layer, d in found.items()} == {4: "resid_post", 5: "mlp_in"}
    with pytest.raises(NdxInputError, match=r"no dictionary .* reads layer\(s\) \[6\]"):
        dictionaries_by_layer(root / "sparsify", None, [4, 6])
    with pytest.raises(NdxInputError, match="does not exist"):
        dictionaries_by_layer(root / "nowhere", None, [4])


def test_a_dictionary_that_does_not_fit_the_model_is_refused(dictionary_run):
    _, _, _, root = dictionary_run
    # the relu dictionary reads the 576-wide residual stream; told it reads the 1536-wide MLP hidden units:
    with pytest.raises(NdxInputError, match="576-wide activations but mlp_hidden of layer 1 .* 1536 wide"):
        stages.unit_sets(None, [1], units="dictionary", dictionary=str(root / "relu"), dictionary_hook="mlp_hidden",
                         neurons_per_layer=4)
    with pytest.raises(NdxInputError, match="units=dictionary needs a dictionary"):
        stages.unit_sets(None, [1], units="dictionary")
    with pytest.raises(NdxInputError, match="units='sideways' is not known"):
        stages.unit_sets(None, [1], units="sideways")


# ------------------------------------------------------------------------------------------------ through Dagster

SMALL_RUN = dict(
    subject_model={"window_tokens": 24},
    quality={"baselines": ["lookup", "random"], "scorers": ["embedding"], "scorer_excerpts": 2,
             "calibration_top_excerpts": 1, "calibration_random_excerpts": 1},
)
SMALL_SELECTION = {"explain_excerpts": 2, "score_top_excerpts": 2, "score_random_excerpts": 1}


def run_graph(storage, layer: int, variant: str, selection: dict, instance=None, extra_config: dict | None = None):
    """One run of the whole graph for `layer` of `variant` (made a key of the instance's variant dimension), on a
    quarter of the bundled corpus (its first documents, written beside `storage`)."""
    import dagster as dg

    from ndx_pipeline.definitions import build_definitions
    from ndx_pipeline.defs.automation import MAIN_JOB
    from ndx_pipeline_tests.runs import execute_layers
    from ndx_pipeline_tests.test_variants import part_of_the_bundled_corpus

    corpus = storage.parent / "corpus"
    if not corpus.exists():
        part_of_the_bundled_corpus(corpus)
    resources = {"storage": {"config": {"storage_dir": str(storage)}},
                 "corpus_source": {"config": {"path": str(corpus)}},
                 "selection": {"config": {**SMALL_SELECTION, **selection}},
                 **{name: {"config": values} for name, values in SMALL_RUN.items()}}
    for name, values in ((extra_config or {}).get("resources") or {}).items():
        resources.setdefault(name, {"config": {}})["config"].update(values["config"])
    job = build_definitions().resolve_job_def(MAIN_JOB)
    return execute_layers(job, instance or dg.DagsterInstance.ephemeral(), layer, variant=variant,
                          run_config={"resources": resources})


def read(storage, asset, layer, variant):
    from ndx_pipeline.core.storage import asset_path

    return pl.read_parquet(asset_path(storage, asset, layer, variant))


@pytest.mark.slow
def test_both_sides_of_a_neuron_go_end_to_end_as_two_units(tmp_path):
    """Run as the variant `neurons-both`, whose name implies units=both (no variants file, no units in the config)."""
    from ndx_pipeline.reports.lineage import format_lineage, lineage

    storage = tmp_path / "storage"
    variant = "neurons-both"
    result = run_graph(storage, 0, variant, {"neurons": [5, 77]})
    assert result.success
    units = [5, 77, -6, -78]
    records = read(storage, "activation_records", 0, variant)
    assert sorted(records["neuron"].unique()) == sorted(units)
    assert dict(records.group_by("neuron").agg(pl.col("polarity").first()).iter_rows()) == {5: 1, 77: 1, -6: -1,
                                                                                            -78: -1}
    for asset in ("top_excerpts", "explanations", "scores", "embedding_scores"):
        assert sorted(read(storage, asset, 0, variant)["neuron"].unique()) == sorted(units), asset
    scores = read(storage, "scores", 0, variant)
    assert scores.filter(pl.col("neuron") == -6)["explanation_id"][0] == f"{variant}/0/-6/explanation/0"
    # the negative unit's excerpts are where the neuron goes furthest below zero, stored negated
    top = read(storage, "top_excerpts", 0, variant).filter(pl.col("neuron") == -6, pl.col("split") == "score_top")
    assert len(top) == 2 and (top["max_activation"] > 0).all()
    assert top["excerpt_id"].str.starts_with(f"{variant}/0/-6/top/").all()
    # lineage and the viewer name the side (a negative unit whose explanation the small model wrote usably)
    unit = scores.filter((pl.col("neuron") < 0) & (pl.col("status") == "ok"))["neuron"][0]
    index = -1 - unit
    found = lineage(storage, 0, unit, variant=variant)
    assert found["unit"] == {"kind": MLP_NEURON, "polarity": -1, "index": index, "source": None,
                             "label": f"neuron {index} (negative)"}
    assert found["checks"]["all_links_resolved"]
    assert format_lineage(found).startswith(
        f"layer 0 neuron {index} (negative)  (unit id {unit}; variant {variant};")
    page = (storage / "neuron_viewer" / variant / "0" / f"{unit}.html").read_text()
    assert f"neuron {index} (negative)" in page


@pytest.mark.slow
def test_a_new_dictionary_is_noticed_by_the_sensor_and_explained_through_dagster(subject, small_windows, tmp_path):
    """A SAELens dictionary lands in the watched folder; the sensor makes it a variant of its own (named after its
    folder, declared in the variants file) and asks for its layer's run; the run explains and scores the live
    latents, records the dead one, and lineage names the dictionary."""
    import dagster as dg

    from ndx_pipeline.core.variants import read_variants, variants_file
    from ndx_pipeline.defs.automation import dictionary_sensor
    from ndx_pipeline.defs.partitions import VARIANT, layer_and_variant
    from ndx_pipeline.defs.resources import StorageResource
    from ndx_pipeline.reports.lineage import lineage

    model, tok = subject
    h = captured(model, tok, small_windows, {"resid_post_1": (model.layers[1], "out")})["resid_post_1"]
    W, b_enc, b_dec = directions(h, 11)
    watched = tmp_path / "dictionaries"
    watched.mkdir()
    storage = tmp_path / "storage"
    resources = {"storage": StorageResource(storage_dir=str(storage))}
    instance = dg.DagsterInstance.ephemeral()
    sensor = dictionary_sensor(str(watched))
    context = dg.build_sensor_context(instance=instance, resources=resources)
    assert isinstance(sensor(context), dg.SkipReason)  # nothing there yet
    folder = saelens_folder(watched, "layer1-relu", "standard", W, b_enc, b_dec, "blocks.1.hook_resid_post")
    context = dg.build_sensor_context(instance=instance, cursor=context.cursor, resources=resources)
    found = sensor(context)
    assert isinstance(found, dg.SensorResult)
    requests, variant = found.run_requests, "layer1-relu"
    assert len(requests) == 1 and requests[0].partition_key == "1|layer1-relu"
    assert layer_and_variant(requests[0].partition_key) == (1, variant)
    assert requests[0].run_config in ({}, None)  # the variant's settings are in the variants file
    assert read_variants(variants_file(storage)) == {
        variant: {"selection": {"units": "dictionary", "dictionary": folder.as_posix()}}}
    [added] = found.dynamic_partitions_requests
    assert added.partitions_def_name == VARIANT and list(added.partition_keys) == [variant]
    instance.add_dynamic_partitions(added.partitions_def_name, list(added.partition_keys))
    again = dg.build_sensor_context(instance=instance, cursor=context.cursor, resources=resources)
    assert isinstance(sensor(again), dg.SkipReason)  # seen: no second run

    result = run_graph(storage, 1, variant, {"neurons": [0, 3, LATENTS - 1]}, instance, requests[0].run_config)
    assert result.success
    records = read(storage, "activation_records", 1, variant)
    assert set(records["unit_kind"]) == {DICTIONARY_LATENT}
    assert records.filter(pl.col("neuron") == LATENTS - 1)["kind"].to_list() == [DEAD]
    assert "layer1-relu" in records["unit_source"][0] and "resid_post" in records["unit_source"][0]
    for asset in ("top_excerpts", "explanations", "scores"):  # no LLM call for the dead one
        assert sorted(read(storage, asset, 1, variant)["neuron"].unique()) == [0, 3], asset
    assert set(read(storage, "simulations", 1, variant)["neuron"]) <= {0, 3}
    scores = read(storage, "scores", 1, variant)
    assert scores["explanation_id"].str.starts_with(f"{variant}/1/").all()
    latent = scores.filter(pl.col("status") == "ok")["neuron"][0]
    found = lineage(storage, 1, latent, variant=variant)
    assert found["unit"]["label"] == f"latent {latent}" and "layer1-relu" in found["unit"]["source"]
    assert found["checks"]["all_links_resolved"]
    # the stored top activations are the latent's encoding of the residual stream of the stored window
    top = records.filter((pl.col("neuron") == 3) & (pl.col("kind") == "top")).sort("rank").row(0, named=True)
    assert top["max_activation"] == pytest.approx(records.filter(pl.col("neuron") == 3)["neuron_max"][0])
    assert (records.filter(pl.col("kind") == "top")["max_activation"] > 0).all()  # only windows where it fired


def test_special_tokens_are_not_dropped_in_silence():
    """special_token_wrap answered "no special tokens" to any tokenizer exception, silently dropping BOS."""
    class Broken:
        def build_inputs_with_special_tokens(self, ids):
            raise RuntimeError("the tokenizer's own failure")

    class Mangling:
        def build_inputs_with_special_tokens(self, ids):
            return [1, 2]  # the text's tokens replaced: where the text goes cannot be told

    class Bos:
        def build_inputs_with_special_tokens(self, ids):
            return [1, *ids]

    with pytest.raises(RuntimeError, match="the tokenizer's own failure"):
        special_token_wrap(Broken())
    with pytest.warns(UserWarning, match="Mangling does not keep a text's tokens apart"):
        assert special_token_wrap(Mangling()) == ([], [])
    assert special_token_wrap(Bos()) == ([1], [])
    assert special_token_wrap(object()) == ([], [])  # no way to say: none


def test_a_latent_whose_activations_are_not_finite_fails_alone(subject, small_windows, tmp_path):
    """The sparse path (dictionary latents given as their nonzero entries): a latent whose encoder overflows to
    ±inf fails with its count and first window, and the dictionary's other latents keep the records they have
    without it."""
    model, tok = subject
    h = captured(model, tok, small_windows, {"resid_post_1": (model.layers[1], "out")})
    W, b, d = directions(h["resid_post_1"], 1)
    broken = W.copy()
    broken[:, 2] = 3e38  # finite weights (the loader refuses others) whose products overflow float32 to ±inf
    units = {}
    for name, weights in (("clean", W), ("broken", broken)):
        folder = saelens_folder(tmp_path, name, "standard", weights, b, d, "blocks.1.hook_resid_post")
        units[name] = DictionaryLatents(1, load_dictionary(folder), list(range(LATENTS)))
    found, _ = forward_pass.extract(model, tok, small_windows, units, top_k=TOP_K, random_k=RANDOM_K, seed=3,
                                    batch_size=7)
    failed = found["broken"].failed()
    assert list(failed) == [2] and failed[2][0] > 0 and failed[2][1] >= 0
    assert found["clean"].failed() == {}
    texts = TokenTexts(tok)
    clean = record_frames.records_frame(1, found["clean"], small_windows, texts, units["clean"])
    records = record_frames.records_frame(1, found["broken"], small_windows, texts, units["broken"])
    assert records.filter(pl.col("neuron") == 2)["kind"].to_list() == ["failed"]

    def others(frame):  # (unit_source names each dictionary's own file)
        return frame.filter(pl.col("neuron") != 2).with_columns(pl.col("tokens").cast(pl.List(pl.String))).drop(
            "unit_source")

    assert others(records).equals(others(clean))
