"""The paper's interleaved splits, disjoint by construction."""

import polars as pl
import pytest

from ndx_pipeline.core.contract import EXCERPT_SCHEMA, RECORD_SCHEMA, SCHEMAS, empty
from ndx_pipeline.core.data.excerpts import split_excerpts
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.stages import top_excerpts
from ndx_pipeline.core.storage import write_parquet_atomic


def records(top_windows, random_windows, neuron=3):
    rows = []
    for kind, windows in (("top", top_windows), ("random", random_windows)):
        for rank, w in enumerate(windows):
            rows.append({
                "layer": 0, "neuron": neuron, "kind": kind, "rank": rank, "doc_id": f"d{w}", "token_start": 0,
                "tokens": ["a", "b"], "activations": [float(w), 0.0], "window_index": w, "char_start": 0,
                "char_end": 2, "max_activation": float(w), "neuron_mean": 0.0, "neuron_variance": 0.0,
                "neuron_max": 0.0, "neuron_token_count": 10,
            })
    return pl.DataFrame(rows, schema=RECORD_SCHEMA)


def test_interleaved_splits_match_the_paper():
    top = list(range(100, 120))  # rank r ↔ window 100 + r
    rand = list(range(200, 220))
    out = split_excerpts(records(top, rand))
    by = {s: out.filter(pl.col("split") == s) for s in ("explain", "score_top", "score_random")}
    assert by["explain"]["rank"].to_list() == [0, 4, 8, 12, 16]
    assert by["score_top"]["rank"].to_list() == [2, 6, 10, 14, 18]
    assert by["score_random"]["rank"].to_list() == [1, 4, 7, 10, 13]
    assert out["excerpt_id"].n_unique() == len(out) == 15
    assert by["explain"]["excerpt_id"][0] == "0/3/top/0"
    # as the pipeline writes them: each id scoped to its variant, the rows otherwise the same
    scoped = top_excerpts(records(top, rand), scope="neurons-both")
    assert scoped["excerpt_id"].to_list() == [f"neurons-both/{i}" for i in out["excerpt_id"]]
    assert scoped.drop("excerpt_id").equals(out.drop("excerpt_id"))


def test_random_windows_that_are_top_windows_are_never_scored():
    top = list(range(100, 120))
    rand = [105, 200, 110, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217]
    out = split_excerpts(records(top, rand))
    explain = set(out.filter(pl.col("split") == "explain")["window_index"])
    scored = set(out.filter(pl.col("split") != "explain")["window_index"])
    assert not explain & scored
    assert not set(out.filter(pl.col("split") == "score_random")["window_index"]) & set(top)
    # the filtered random list is [200, 201, ...]: offsets 1, 4, 7, 10, 13
    assert out.filter(pl.col("split") == "score_random")["window_index"].to_list() == [201, 204, 207, 210, 213]


def test_too_few_windows_is_a_clear_error():
    with pytest.raises(NdxInputError, match="layer 0 neuron 3 has 10 top"):
        split_excerpts(records(list(range(10)), list(range(50, 70))))


def test_a_unit_that_fired_in_too_few_windows_is_left_out_and_the_others_kept():
    """A sparse latent with 3 firing windows cannot fill explain and score_top: it is left out (its records stay),
    while a unit with enough windows is split as usual; when no unit has enough, it is the corpus that is too small."""
    both = pl.concat([records(list(range(100, 120)), list(range(200, 220)), neuron=3),
                      records([100, 101, 102], list(range(200, 220)), neuron=-4)])
    out = split_excerpts(both)
    assert out["neuron"].unique().to_list() == [3] and len(out) == 15
    calibrated = top_excerpts(both, calibration_top=1, calibration_random=1)
    assert calibrated["neuron"].unique().to_list() == [3]
    with pytest.raises(NdxInputError, match="layer 0 neuron -4 has 3 top"):
        split_excerpts(records([100, 101, 102], list(range(200, 220)), neuron=-4))


def test_token_texts_held_as_codes_are_written_as_the_same_strings_and_bytes(tmp_path):
    """Records built with their token texts as codes (List(Enum), as `records_frame` builds them: here with categories
    out of order and some unused) and the same records as strings give byte-identical files, both for the records
    and for the excerpts split from them, which read back as the contract's List(String)."""
    texts = pl.DataFrame({"window_index": range(100, 140)}).select(
        tokens=pl.concat_list(pl.format("w{}", "window_index"), pl.lit(" the"), pl.lit("é"), pl.lit("")))
    as_strings = records(list(range(100, 120)), list(range(120, 140))).with_columns(texts["tokens"])
    categories = pl.Enum(["unused", "é", " the", ""] + [f"w{w}" for w in range(139, 99, -1)])
    as_codes = as_strings.with_columns(pl.col("tokens").cast(pl.List(categories)))
    for name, frame in (("records", lambda r: r), ("excerpts", split_excerpts)):
        paths = [write_parquet_atomic(frame(r), tmp_path / f"{name}-{held}.parquet")
                 for held, r in (("strings", as_strings), ("codes", as_codes))]
        assert paths[0].read_bytes() == paths[1].read_bytes(), name
        stored = pl.read_parquet(paths[1])
        assert stored.schema == pl.Schema(RECORD_SCHEMA if name == "records" else EXCERPT_SCHEMA)
        assert stored.equals(frame(as_strings))
    assert pl.read_parquet(paths[1])["tokens"][0].to_list() == ["w100", " the", "é", ""]


def test_every_contract_file_reads_back_with_its_schema(tmp_path):
    """The files hold no Arrow schema: each asset's columns read back as the contract types from Parquet's own, for
    an empty file and for rows with null and empty lists, empty strings and non-ASCII text."""
    for asset, schema in SCHEMAS.items():
        path = write_parquet_atomic(empty(asset), tmp_path / f"{asset}.parquet")
        assert pl.read_parquet(path).schema == pl.Schema(schema), asset
    rows = records([100, 101], [200]).with_columns(
        tokens=pl.Series([["é", ""], None, []], dtype=pl.List(pl.String)),
        quantile_boundaries=pl.Series([[0.5, float("nan")], None, []], dtype=pl.List(pl.Float64)),
        doc_id=pl.Series(["d", None, ""]), max_activation=pl.Series([1.5, None, float("-inf")], dtype=pl.Float32))
    path = write_parquet_atomic(rows, tmp_path / "rows.parquet")
    assert pl.read_parquet(path).equals(rows)
