"""The dataset export (`reports.dataset.write_dataset`) and the on-demand `release` asset, on the files of the session's
real stored run (conftest's `two_variants`: the bundled model, layers 0-2 of two variants through every asset).

Every exported file's rows are the stored files' rows, the card's figures are the scores', polars reads every file,
and `datasets` (when installed) loads the folder as the card says."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from ndx_pipeline.core.contract import (
    BASELINE_EXPLANATIONS,
    CORPUS,
    DETECTION_SCORES,
    EMBEDDING_SCORES,
    EXPLANATIONS,
    FUZZING_SCORES,
    RELEASE,
    SCORES,
    SIMULATIONS,
    TOP_EXCERPTS,
)
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.storage import asset_path, stored_variants, variant_layers
from ndx_pipeline.core.variants import control_name, control_of
from ndx_pipeline.reports import dataset as dataset_module
from ndx_pipeline.reports.dataset import (
    CARD,
    DEFAULT_TABLE,
    TABLES,
    exportable_variants,
    table_file,
    write_dataset,
)
from ndx_pipeline_tests.test_lineage import copy_variant

SUBJECT = "bundled:SmolLM2-135M-Instruct"
CONTROL = control_name("neurons", "random-weights")

pytestmark = pytest.mark.slow  # the shared run on the bundled model


@pytest.fixture(scope="module")
def storage(two_variants, tmp_path_factory) -> Path:
    """A copy of the shared run's storage (the tests write beside it and must leave the shared one as it is), with a
    control variant: the real one when test_variants made it before, else variant `neurons`' layer 0 copied under
    the control's name (what the export does with a control depends only on the name)."""
    copy = tmp_path_factory.mktemp("dataset") / "storage"
    shutil.copytree(two_variants["storage"], copy)
    if CONTROL not in stored_variants(copy, SCORES):
        copy_variant(copy, "neurons", CONTROL, layers=[0])
    return copy


@pytest.fixture(scope="module")
def export(storage, tmp_path_factory):
    return write_dataset(storage, tmp_path_factory.mktemp("export") / "out", about={"subject_model": SUBJECT})


def stored_files(storage: Path, asset: str, variants=None, layers=None) -> list[tuple[str, int, Path]]:
    """The stored files of `asset` that hold rows (a scorer that did not run leaves empty ones)."""
    names = sorted(variants or stored_variants(storage, asset))
    found = [(v, layer, asset_path(storage, asset, layer, v)) for v in names
             for layer in variant_layers(storage, asset, v) if layers is None or layer in layers]
    return [f for f in found if len(pl.read_parquet(f[2]))]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:card.index("\n---\n", 4)])


def card_score_table(card: str) -> list[dict]:
    lines = card.splitlines()
    start = lines.index("| variant | layer | units | scored | mean | median | min | max |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [x.strip() for x in line.strip("|").split("|")]
        numbers = [math.nan if x == "—" else float(x) for x in cells[4:]]
        rows.append({"variant": cells[0], "layer": int(cells[1]), "units": int(cells[2]), "scored": int(cells[3]),
                     **dict(zip(("mean", "median", "min", "max"), numbers))})
    return rows


# ---------------------------------------------------------------------------------------------------- the files


def test_every_file_holds_the_stored_rows_of_every_variant_and_layer(storage, export):
    variants = exportable_variants(storage)
    assert {"neurons", "sim-f32", CONTROL} <= set(variants) and export.variants == variants
    # every asset kind the run wrote rows of, the scorer's scores included (the run's scorer is embedding; detection
    # and fuzzing, switched off, left empty files)
    assert set(export.files) == {a for a in TABLES if stored_files(storage, a)}
    assert all(stored_variants(storage, a) for a in (DETECTION_SCORES, FUZZING_SCORES))
    assert not {DETECTION_SCORES, FUZZING_SCORES} & set(export.files)
    assert {SCORES, EXPLANATIONS, BASELINE_EXPLANATIONS, EMBEDDING_SCORES, TOP_EXCERPTS} <= set(export.files)
    for asset, path in export.files.items():
        assert path == export.out / table_file(asset) and path.exists()
        table = pl.read_parquet(path)
        assert table.columns[:2] == ["variant", "control"] and len(table) == export.rows[asset]
        stored = stored_files(storage, asset)
        assert sum(len(pl.read_parquet(p)) for *_, p in stored) == len(table)
        offset = 0
        for variant, layer, source in stored:  # variants by name, layers in order, rows as stored
            rows = pl.read_parquet(source)
            mine = table.slice(offset, len(rows))
            offset += len(rows)
            assert (mine["variant"] == variant).all() and mine["layer"].unique().to_list() in ([layer], [])
            assert mine["control"].to_list() == [control_of(variant)] * len(rows)
            assert_frame_equal(mine.select(rows.columns), rows.cast({k: table.schema[k] for k in rows.columns}),
                               check_exact=True)
            for column in set(table.columns) - set(rows.columns) - {"variant", "control"}:
                assert mine[column].null_count() == len(rows), (asset, variant, column)  # another variant's column
    scores = pl.read_parquet(export.files[SCORES])
    assert scores.filter(pl.col("control") == "random-weights")["variant"].unique().to_list() == [CONTROL]
    assert (export.out / "data").is_dir() and sorted(p.name for p in export.out.iterdir()) == [CARD, "data"]


def test_the_card_says_what_was_explained_and_its_figures_are_the_scores(storage, export):
    card = (export.out / CARD).read_text(encoding="utf-8")
    assert card == export.card
    meta = front_matter(card)
    assert "license" in meta and meta["license"] is None  # left for the user, and said so
    assert "fill in before publishing" in card and "## License" in card
    configs = {x["config_name"]: x for x in meta["configs"]}
    assert set(configs) == set(export.files) and configs[DEFAULT_TABLE].get("default") is True
    for name, entry in configs.items():
        assert entry["data_files"] == [{"split": name, "path": table_file(name)}]
        assert (export.out / entry["data_files"][0]["path"]).exists()

    # the score distribution per layer: recomputed here from the exported scores
    scores = pl.read_parquet(export.files[SCORES])
    table = card_score_table(card)
    expected = scores.group_by("variant", "layer").agg(
        pl.len().alias("units"), pl.col("score").filter(pl.col("score").is_finite()).alias("finite")).sort(
        "variant", "layer")
    assert [(r["variant"], r["layer"]) for r in table] == list(zip(expected["variant"], expected["layer"]))
    for row, want in zip(table, expected.iter_rows(named=True)):
        finite = want["finite"]
        assert row["units"] == want["units"] and row["scored"] == len(finite)
        figures = {"mean": sum(finite) / len(finite), "median": float(pl.Series(finite).median()),
                   "min": min(finite), "max": max(finite)} if finite else dict.fromkeys(row, math.nan)
        for k in ("mean", "median", "min", "max"):
            assert row[k] == pytest.approx(round(figures[k], 4), abs=1e-9, nan_ok=True), (row, k)
    assert any(r["scored"] for r in table)

    # model, corpus and its content digest (recomputed here from its definition in the card), units, explainer,
    # simulator, scorer, counts
    assert f"subject model: `{SUBJECT}`" in card
    corpus = pl.read_parquet(asset_path(storage, CORPUS))
    digest = hashlib.sha256()
    for row in corpus.select("doc_id", "source", "text").iter_rows():
        for field in row:
            digest.update(len(field.encode()).to_bytes(8, "big") + field.encode())
    assert f"corpus: {len(corpus)} documents" in card and f"content sha256 `{digest.hexdigest()}`" in card
    explanations = pl.read_parquet(export.files[EXPLANATIONS])
    for variant in ("neurons", "sim-f32"):
        section = card[card.index(f"### `{variant}`"):]
        section = section[:section.index("\n###") if "\n###" in section else section.index("## Files")]
        assert "- layers: 0, 1, 2" in section and "mlp_neuron (positive side)" in section
        for explainer in explanations.filter(pl.col("variant") == variant)["explainer"].unique():
            assert f"`{explainer}`" in section
        simulators = pl.concat([pl.read_parquet(p, columns=["simulator"])
                                for *_, p in stored_files(storage, SIMULATIONS, [variant])])["simulator"]
        for simulator in simulators.unique():
            assert f"`{simulator}`" in section
        assert "- embedding scorer: `" in section
        baselines = sorted(n.removeprefix("baseline_") for n in pl.read_parquet_schema(
            asset_path(storage, SCORES, 0, variant)) if n.startswith("baseline_"))
        assert baselines and f"(`baseline_<name>` columns): {', '.join(baselines)}\n" in section
    assert "simulator_llm settings (variants file): dtype=float32" in card
    assert "control of `neurons`" in card[card.index(f"### `{CONTROL}`"):]
    for asset, path in export.files.items():
        assert f"| `{asset}` | `{table_file(asset)}` | {export.rows[asset]} |" in card


def test_datasets_loads_the_folder_as_the_card_says(export, tmp_path):
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("the datasets library is not installed (the test extra installs it)")
    import datasets

    scores = pl.read_parquet(export.files[SCORES])
    loaded = datasets.load_dataset("parquet", data_dir=str(export.out), cache_dir=str(tmp_path / "cache"))
    assert list(loaded) == [DEFAULT_TABLE]  # the one default table, not every file of the folder as one
    assert_frame_equal(pl.from_arrow(loaded[DEFAULT_TABLE].data.table), scores, check_dtypes=False, check_exact=True)
    for name, path in export.files.items():  # every config of the card's front matter
        config = datasets.load_dataset(str(export.out), name, cache_dir=str(tmp_path / "cache"))
        assert list(config) == [name]
        assert_frame_equal(pl.from_arrow(config[name].data.table), pl.read_parquet(path), check_dtypes=False,
                           check_exact=True)


# ---------------------------------------------------------------------------------------------------- choosing


def test_chosen_variants_come_with_their_controls_and_layers_filter(storage, tmp_path):
    done = write_dataset(storage, tmp_path / "neurons", variants=["neurons"], layers=[0])
    assert done.variants == ["neurons", CONTROL] and done.layers == {"neurons": [0], CONTROL: [0]}
    for path in done.files.values():
        table = pl.read_parquet(path)
        assert set(table["variant"]) <= {"neurons", CONTROL} and set(table["layer"]) == {0}
    assert len(pl.read_parquet(done.files[SCORES])) == sum(
        len(pl.read_parquet(p)) for *_, p in stored_files(storage, SCORES, ["neurons", CONTROL], [0]))
    assert "sim-f32" not in done.card and "| neurons | 0 |" in done.card and "| neurons | 1 |" not in done.card
    alone = write_dataset(storage, tmp_path / "alone", variants=["neurons"], controls=False)
    assert alone.variants == ["neurons"]
    assert "subject model: not recorded in the files" in alone.card  # nothing passed, nothing invented


def test_bad_input_is_refused_in_one_sentence_and_nothing_is_written(storage, export, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NdxInputError, match="nothing to export under .*run the pipeline through scores first"):
        write_dataset(empty, tmp_path / "a")
    with pytest.raises(NdxInputError, match=r"variant nope has nothing to export .*variants with files: .*neurons"):
        write_dataset(storage, tmp_path / "b", variants=["nope"])
    with pytest.raises(NdxInputError, match="no scores for variants neurons.* on layers 7"):
        write_dataset(storage, tmp_path / "c", variants=["neurons"], layers=[7])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(NdxInputError, match=r"holds notes.txt, which is not part of a dataset export"):
        write_dataset(storage, other)
    with pytest.raises(NdxInputError, match="output folder .* holds "):
        write_dataset(storage, storage)  # the storage itself is not an export
    (tmp_path / "file").write_text("x")
    with pytest.raises(NdxInputError, match="is a file"):
        write_dataset(storage, tmp_path / "file")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]

    # an earlier export is replaced whole; a failure half-way leaves it as it was, and no temporary folder
    out = tmp_path / "again"
    first = write_dataset(storage, out, variants=["sim-f32"])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []
    real = dataset_module._write_table

    def fails_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "_write_table", fails_on_the_second)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(storage, out)
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    second = write_dataset(storage, out)
    assert second.variants != first.variants and set(second.files) >= set(first.files)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders were left"


# ---------------------------------------------------------------------------------------------------- the asset


def test_the_release_asset_writes_the_export_with_its_card_as_metadata(two_variants, storage):
    from ndx_pipeline.definitions import build_definitions
    from ndx_pipeline.defs.automation import MAIN_JOB
    from ndx_pipeline.defs.resources import StorageResource

    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    node = graph.get(dg.AssetKey(RELEASE))
    assert node.partitions_def is None and node.automation_condition is None
    assert {SCORES, EXPLANATIONS, TOP_EXCERPTS} <= {k.to_user_string() for k in node.parent_keys}
    main = defs.resolve_job_def(MAIN_JOB)
    assert dg.AssetKey(RELEASE) not in main.asset_layer.selected_asset_keys  # `ndx-pipeline run` leaves it out
    assert dg.AssetKey(SCORES) in main.asset_layer.selected_asset_keys

    # on the instance of the run that made the files: the subject model is what that run recorded
    instance, release = two_variants["instance"], defs.get_assets_def(dg.AssetKey(RELEASE))
    resources = {"storage": StorageResource(storage_dir=str(storage))}
    result = dg.materialize([release], instance=instance, resources=resources)
    assert result.success
    out = storage / "release"  # the default folder
    meta = result.asset_materializations_for_node(RELEASE)[0].metadata
    card = (out / CARD).read_text(encoding="utf-8")
    assert meta["card"].value == card and f"subject model: `{SUBJECT}`" in card
    assert meta["path"].value == str(out) and meta["files"].value == len(list((out / "data").iterdir()))
    for asset in TABLES:
        if (out / table_file(asset)).exists():
            assert meta[f"rows_{asset}"].value == len(pl.read_parquet(out / table_file(asset)))
    assert meta["variants"].value == ", ".join(exportable_variants(storage))
    assert re.search(r"\| neurons \| 2 \| \d+ \| \d+ \|", card)

    # a chosen variant, elsewhere; an unknown one fails the run with its one sentence
    chosen = dg.materialize([release], instance=instance, resources=resources, run_config={
        "ops": {RELEASE: {"config": {"variants": ["sim-f32"], "out": str(storage.parent / "sim")}}}})
    assert chosen.success and set(pl.read_parquet(storage.parent / "sim" / table_file(SCORES))["variant"]) == {
        "sim-f32"}
    bad = dg.materialize([release], instance=instance, resources=resources, raise_on_error=False, run_config={
        "ops": {RELEASE: {"config": {"variants": ["nope"]}}}})
    assert not bad.success
    failure = next(e for e in bad.all_events if e.is_step_failure).step_failure_data
    assert "variant nope has nothing to export" in failure.user_failure_data.description
