"""The data contract, once: every asset's name, every Parquet schema, and the shared vocabulary (splits, record
kinds, baselines, identifiers). Stages, reports, the Dagster skin and the tests all read these names from here.

Files live at `<storage>/<asset>/<variant>/<layer>.parquet` (`<storage>/corpus.parquet` for the corpus; see `storage`
and `variants`). The
columns below are what each stage writes; DESIGN.md lists the subset users may rely on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl

# ------------------------------------------------------------------------------------------------------ assets

CORPUS = "corpus"
ACTIVATION_RECORDS = "activation_records"
TOKEN_TABLE = "token_table"
OUTPUT_TOKENS = "output_tokens"  # per unit: the tokens its output direction promotes and suppresses (the weights')
TOP_EXCERPTS = "top_excerpts"
EXPLANATIONS = "explanations"
BASELINE_EXPLANATIONS = "baseline_explanations"
CALIBRATION_SIMULATIONS = "calibration_simulations"
SIMULATIONS = "simulations"
BASELINE_SIMULATIONS = "baseline_simulations"
SCORES = "scores"
# The scorers beside simulation (each its own step: judgements, and one score row per neuron), and the held-out
# excerpts they judge
SCORER_EXCERPTS = "scorer_excerpts"
DETECTION_JUDGEMENTS, DETECTION_SCORES = "detection_judgements", "detection_scores"
FUZZING_JUDGEMENTS, FUZZING_SCORES = "fuzzing_judgements", "fuzzing_scores"
EMBEDDING_JUDGEMENTS, EMBEDDING_SCORES = "embedding_judgements", "embedding_scores"
NEURON_VIEWER = "neuron_viewer"
# On demand, outside the pipeline's run (not in ASSETS): the dataset export of chosen variants with its card
# (`reports/dataset.py`)
RELEASE = "release"

# The paper's chain, in order: what lineage follows from a score back to its documents.
STAGES = (CORPUS, ACTIVATION_RECORDS, TOP_EXCERPTS, EXPLANATIONS, SIMULATIONS, SCORES)
# Every asset, upstream first. Each stage also writes the files beside its main output that the later stages read
# (the token table, the baselines' explanations and simulations, best-of-k's calibration simulations).
ASSETS = (CORPUS, ACTIVATION_RECORDS, TOKEN_TABLE, OUTPUT_TOKENS, TOP_EXCERPTS, EXPLANATIONS, BASELINE_EXPLANATIONS,
          CALIBRATION_SIMULATIONS, SIMULATIONS, BASELINE_SIMULATIONS, SCORES, SCORER_EXCERPTS, DETECTION_JUDGEMENTS,
          DETECTION_SCORES, FUZZING_JUDGEMENTS, FUZZING_SCORES, EMBEDDING_JUDGEMENTS, EMBEDDING_SCORES,
          NEURON_VIEWER)
PARQUET_ASSETS = tuple(a for a in ASSETS if a != NEURON_VIEWER)
LAYER_ASSETS = tuple(a for a in PARQUET_ASSETS if a != CORPUS)

# ------------------------------------------------------------------------------------------------------ vocabulary

TOP, RANDOM = "top", "random"  # record kinds; quantile samples are `quantile_<bucket>`
DEAD = "dead"  # the one record of a unit that never fired over the corpus (no window; nothing downstream explains it)
# the one record of a unit whose activation was not finite (NaN, ±inf) on some token: its `error` says on how many
# and the first window (`window_index`); nothing downstream explains it
FAILED_UNIT = "failed"
QUANTILE_KIND_PREFIX = "quantile_"

EXPLAIN, SCORE_TOP, SCORE_RANDOM, CALIBRATION = "explain", "score_top", "score_random", "calibration"
SCORED_SPLITS = (SCORE_TOP, SCORE_RANDOM)

# the scorers' held-out excerpts (`scorer_excerpts`): windows that fire strongly, and windows that do not
ACTIVATING, NON_ACTIVATING = "activating", "non_activating"
SCORER_SPLITS = (ACTIVATING, NON_ACTIVATING)

# The scorers beside simulation: name → (judgements asset, scores asset). Which run is a setting (`quality.scorers`).
DETECTION, FUZZING, EMBEDDING = "detection", "fuzzing", "embedding"
SCORERS = (DETECTION, FUZZING, EMBEDDING)
SCORER_ASSETS = {DETECTION: (DETECTION_JUDGEMENTS, DETECTION_SCORES), FUZZING: (FUZZING_JUDGEMENTS, FUZZING_SCORES),
                 EMBEDDING: (EMBEDDING_JUDGEMENTS, EMBEDDING_SCORES)}

STATUS_OK = "ok"
STATUS_FAILED = "failed"

LOOKUP_BASELINE, RANDOM_BASELINE, TOKEN_LIST_BASELINE = "lookup", "random", "token_list"
BASELINES = (LOOKUP_BASELINE, RANDOM_BASELINE, TOKEN_LIST_BASELINE)
SIMULATED_BASELINES = (RANDOM_BASELINE, TOKEN_LIST_BASELINE)  # explanations an LLM simulates beside ours
# a planted unit's true explanation (written from its rule) and a wrong one (another planted unit's): the judge's
# control, simulated and judged beside ours for planted units only (`core/data/planted.py`, `method/controls.py`)
PLANTED_TRUE, PLANTED_WRONG = "planted_true", "planted_wrong"
CONTROL_BASELINES = (PLANTED_TRUE, PLANTED_WRONG)
JUDGED_BASELINES = (*SIMULATED_BASELINES, *CONTROL_BASELINES)  # every explanation judged beside ours
BASELINE_COLUMN_PREFIX = "baseline_"


def baseline_column(name: str) -> str:
    return BASELINE_COLUMN_PREFIX + name


def quantile_kind(bucket: int) -> str:
    return f"{QUANTILE_KIND_PREFIX}{bucket}"


# ------------------------------------------------------------------------------------------------------ identifiers


def scoped(frame: pl.DataFrame, column: str, scope: str | None) -> pl.DataFrame:
    """`frame` with its `column` of ids prefixed by `<scope>/` (the variant), so that ids are unique across the
    variants of one storage folder: latent 5 and neuron 5 of layer 6 are `latents/6/5/top/0` and `neurons/6/5/top/0`.
    No scope: the ids as they are."""
    if not scope or column not in frame.columns:
        return frame
    return frame.with_columns((pl.lit(f"{scope}/") + pl.col(column)).alias(column))


def excerpt_id(layer: int, neuron: int, kind: str, rank: int) -> str:
    return f"{layer}/{neuron}/{kind}/{rank}"


def explanation_id(layer: int, neuron: int, candidate: int = 0) -> str:
    return f"{layer}/{neuron}/explanation/{candidate}"


def random_explanation_id(layer: int, neuron: int, donor: int) -> str:
    return f"{layer}/{neuron}/random/{donor}"


def token_list_explanation_id(layer: int, neuron: int) -> str:
    return f"{layer}/{neuron}/token_list"


def control_explanation_id(layer: int, neuron: int, baseline: str) -> str:
    return f"{layer}/{neuron}/{baseline}"


def lookup_explanation_id(layer: int, neuron: int, held_out: bool = True) -> str:
    return f"{layer}/{neuron}/lookup" + ("" if held_out else "-in-sample")


# Units (see `RECORD_SCHEMA`'s unit columns): what a row's `neuron` id names
MLP_NEURON, DICTIONARY_LATENT = "mlp_neuron", "dictionary_latent"


def negative_id(neuron: int) -> int:
    """The unit id of a neuron's negative side: -1 - index (neuron 0's negative side is -1)."""
    return -1 - int(neuron)


def unit_index(unit_id: int) -> tuple[int, int]:
    """(neuron or latent index, polarity +1/-1) of a unit id."""
    return (int(unit_id), 1) if unit_id >= 0 else (-1 - int(unit_id), -1)


def seed_key(unit_id: int) -> int:
    """A non-negative stand-in for a unit id in seeds (numpy's seeds take no negative numbers): the id itself for a
    neuron's positive side or a latent, 2**32 + index for a neuron's negative side."""
    return int(unit_id) if unit_id >= 0 else (1 << 32) + (-1 - int(unit_id))


def unit_label(unit_id: int, kind: str = MLP_NEURON) -> str:
    """How a unit is named to people: "neuron 5", "neuron 5 (negative)", "latent 5"."""
    index, sign = unit_index(unit_id)
    return f"latent {index}" if kind == DICTIONARY_LATENT else f"neuron {index}" + (" (negative)" if sign < 0 else "")


def describe_ids(ids: Sequence[int], kind: str = MLP_NEURON, source: str | None = None) -> dict:
    """The unit columns (`UNIT_COLUMNS`) of units `ids`, one list per column."""
    return {"unit_kind": [kind] * len(ids), "polarity": [unit_index(u)[1] for u in ids],
            "unit_index": [unit_index(u)[0] for u in ids], "unit_source": [source] * len(ids)}


# ------------------------------------------------------------------------------------------------------ schemas

CORPUS_SCHEMA = {"doc_id": pl.String, "source": pl.String, "text": pl.String}

_UNIT = {"layer": pl.Int32, "neuron": pl.Int32}
# a window of a document: where it starts in the document's tokens, its token texts and the unit's activations
_WINDOW = {"doc_id": pl.String, "token_start": pl.Int32, "tokens": pl.List(pl.String),
           "activations": pl.List(pl.Float32)}
_SPAN = {"window_index": pl.Int32, "char_start": pl.Int32, "char_end": pl.Int32}

RECORD_SCHEMA = {
    **_UNIT,
    "kind": pl.String,
    "rank": pl.Int32,
    **_WINDOW,
    **_SPAN,
    "max_activation": pl.Float32,
    "neuron_mean": pl.Float64,
    "neuron_variance": pl.Float64,
    "neuron_max": pl.Float32,
    "neuron_token_count": pl.Int64,
    "quantile_boundaries": pl.List(pl.Float64),  # the neuron's bucket boundaries (null without quantile samples)
    "error": pl.String,  # why the unit failed (a `failed` row; null on every other row)
}
# Which unit a row is. The `neuron` column is the unit's id within its layer: a neuron's index (its positive side),
# -1 - index for a neuron's negative side (whose activations are stored negated), or a dictionary latent's index.
UNIT_COLUMNS = {
    "unit_kind": pl.String,  # mlp_neuron | dictionary_latent
    "polarity": pl.Int8,  # +1, or -1 for a neuron's negative side
    "unit_index": pl.Int32,  # the neuron's or latent's index (the id without its sign)
    "unit_source": pl.String,  # the dictionary: format, architecture, latents, hook and file (null for neurons)
}
RECORD_SCHEMA.update(UNIT_COLUMNS)

TOKEN_TABLE_SCHEMA = {
    **_UNIT,
    "token": pl.String,
    "count": pl.Int64,
    "activation_sum": pl.Float64,
    "mean_activation": pl.Float64,
}

# One row per unit with an output direction (MLP neuron sides, dictionary latents; planted units have none): the
# tokens whose logits that direction raises most (highest first) and lowers most (lowest first), with the logits
OUTPUT_TOKENS_SCHEMA = {
    **_UNIT,
    "promoted_tokens": pl.List(pl.String),
    "promoted_logits": pl.List(pl.Float32),
    "suppressed_tokens": pl.List(pl.String),
    "suppressed_logits": pl.List(pl.Float32),
    "direction": pl.String,  # how the direction was read (which weights, which norm)
    **UNIT_COLUMNS,
}

EXCERPT_SCHEMA = {
    **_UNIT,
    "excerpt_id": pl.String,
    "split": pl.String,
    "kind": pl.String,
    "rank": pl.Int32,
    **_WINDOW,
    "max_activation": pl.Float32,
    **_SPAN,
}

EXPLANATION_SCHEMA = {
    **_UNIT,
    "explanation_id": pl.String,
    "explanation": pl.String,
    "explainer": pl.String,
    "prompt_sha256": pl.String,
    "status": pl.String,
    "error": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "seconds": pl.Float64,
    "excerpts_shown": pl.Int32,  # explain excerpts in the prompt (fewer than the neuron has when they did not fit)
    "prompt_fitted": pl.String,  # what was left out to fit the explainer's context window; null: nothing
}
# best-of-k adds these to `explanations`; baseline explanations add `baseline` (and the random one `donor_neuron`)
CANDIDATE_COLUMNS = {"candidate": pl.Int32, "calibration_score": pl.Float64, "calibration_status": pl.String,
                     "selected": pl.Boolean}
BASELINE_EXPLANATION_SCHEMA = {**EXPLANATION_SCHEMA, "baseline": pl.String}

SIMULATION_SCHEMA = {
    **_UNIT,
    "explanation_id": pl.String,
    "excerpt_id": pl.String,
    "split": pl.String,
    "tokens": pl.List(pl.String),
    "true_activations": pl.List(pl.Float32),
    "simulated_activations": pl.List(pl.Float32),
    "simulator": pl.String,
    "status": pl.String,
    "error": pl.String,
}

SCORE_SCHEMA = {
    **_UNIT,
    "explanation_id": pl.String,
    "explanation": pl.String,
    "score": pl.Float64,
    "score_top": pl.Float64,
    "score_random": pl.Float64,
    "status": pl.String,
    "scored_tokens": pl.Int64,
    # calibrated on the neuron's calibration excerpts (a least-squares line from simulated to true activations):
    "calibrated_ev": pl.Float64,  # explained variance of the scored tokens by the calibrated simulation
    "rsquared": pl.Float64,  # the reference's 1 − mean((r − p)²)/mean(r²), calibrated
    "absolute_dev_explained": pl.Float64,  # the reference's 1 − mean|r − p|/mean|r|, calibrated
    "calibration_slope": pl.Float64,
    "calibration_intercept": pl.Float64,
    "calibration_status": pl.String,
}  # plus one Float64 `baseline_<name>` column per configured baseline

# One row per explanation (ours, or a baseline's: `baseline` names it, null for ours) × excerpt shown to a scorer
JUDGEMENT_SCHEMA = {
    **_UNIT,
    "explanation_id": pl.String,
    "baseline": pl.String,
    "excerpt_id": pl.String,
    "split": pl.String,  # activating / non_activating (scorer_excerpts)
    "marked": pl.List(pl.Int32),  # fuzzing: the token positions marked in the excerpt shown; null otherwise
    "label": pl.Boolean,  # the truth: the excerpt is activating (detection, embedding), correctly marked (fuzzing)
    "verdict": pl.Boolean,  # the scorer LLM's answer (null: failed, or no LLM)
    "similarity": pl.Float64,  # embedding: cosine similarity of excerpt and explanation (null otherwise)
    "prompt": pl.Int32,  # which of the explanation's prompts showed the excerpt (null without an LLM)
    "prompt_sha256": pl.String,  # of that prompt as the backend sent it
    "scorer": pl.String,  # the model that judged (backend or embedding model name)
    "status": pl.String,
    "error": pl.String,
}

# One row per neuron: our explanation's score by one scorer, beside the baselines' scored the same way
SCORER_SCORE_SCHEMA = {
    **_UNIT,
    "explanation_id": pl.String,
    "explanation": pl.String,
    "scorer": pl.String,  # detection / fuzzing / embedding
    "metric": pl.String,  # balanced_accuracy (detection, fuzzing) / roc_auc (embedding)
    "score": pl.Float64,
    "precision": pl.Float64,
    "recall": pl.Float64,
    "f1": pl.Float64,
    "judged": pl.Int64,  # excerpts judged
    "status": pl.String,
    **{BASELINE_COLUMN_PREFIX + name: pl.Float64 for name in SIMULATED_BASELINES},
}

SCHEMAS = {
    CORPUS: CORPUS_SCHEMA,
    ACTIVATION_RECORDS: RECORD_SCHEMA,
    TOKEN_TABLE: TOKEN_TABLE_SCHEMA,
    OUTPUT_TOKENS: OUTPUT_TOKENS_SCHEMA,
    TOP_EXCERPTS: EXCERPT_SCHEMA,
    EXPLANATIONS: EXPLANATION_SCHEMA,
    BASELINE_EXPLANATIONS: BASELINE_EXPLANATION_SCHEMA,
    CALIBRATION_SIMULATIONS: SIMULATION_SCHEMA,
    SIMULATIONS: SIMULATION_SCHEMA,
    BASELINE_SIMULATIONS: SIMULATION_SCHEMA,
    SCORES: SCORE_SCHEMA,
    SCORER_EXCERPTS: EXCERPT_SCHEMA,
    **{judgements: JUDGEMENT_SCHEMA for judgements, _ in SCORER_ASSETS.values()},
    **{scores: SCORER_SCORE_SCHEMA for _, scores in SCORER_ASSETS.values()},
}


def stored_dtype(dtype: pl.DataType) -> pl.DataType:
    """The contract type of a column held as `dtype`: text may be held as codes (pl.Enum, pl.Categorical; the records'
    token lists are built so), which the files store as the strings (`storage.write_parquet_atomic`)."""
    if isinstance(dtype, pl.List):
        return pl.List(stored_dtype(dtype.inner))
    return pl.String if isinstance(dtype, (pl.Enum, pl.Categorical)) else dtype


def concat_layers(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """Frames of several layers as one: a column held as codes whose categories differ between the frames (each
    layer's records hold their token texts as an Enum of their own) becomes its text (`stored_dtype`)."""
    frames = [f for f in frames if f is not None]
    if len(frames) < 2:
        return frames[0] if frames else pl.DataFrame()
    differ = {name for name in frames[0].columns if len({f.schema.get(name) for f in frames}) > 1}

    def text(dtype: pl.DataType) -> pl.DataType:
        if isinstance(dtype, pl.List):
            return pl.List(text(dtype.inner))
        return stored_dtype(dtype)

    return pl.concat([f.with_columns(pl.col(n).cast(text(f.schema[n])) for n in differ if n in f.columns)
                      for f in frames], how="diagonal_relaxed")


def conform(frame: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """`frame`'s columns of `schema`, in its order, cast to its types; text held as codes stays codes (see
    `stored_dtype`: casting 11M tokens to strings would cost what holding them as codes saves)."""
    cast = {name: dtype for name, dtype in schema.items() if stored_dtype(frame.schema[name]) != dtype}
    return frame.select(schema.keys()).cast(cast)


def frame(rows: Sequence[Mapping], schema: Mapping[str, pl.DataType],
          extra: Mapping[str, pl.DataType] | None = None, defaults: Mapping | None = None) -> pl.DataFrame:
    """Rows in `schema` (+ `extra` columns): a field a row lacks is `defaults[field]`, else null."""
    full = {**schema, **(extra or {})}
    defaults = defaults or {}
    return pl.DataFrame([{k: r.get(k, defaults.get(k)) for k in full} for r in rows], schema=full)


def empty(asset: str) -> pl.DataFrame:
    """An asset's file with no rows: what a stage writes for an output its settings switched off."""
    return pl.DataFrame(schema=SCHEMAS[asset])


def kept(explanations: pl.DataFrame) -> pl.DataFrame:
    """One row per neuron: the explanation it keeps (best-of-k marks it `selected`; without candidates, every row)."""
    return explanations.filter(pl.col("selected")) if "selected" in explanations.columns else explanations


def usable(explanations: pl.DataFrame) -> pl.DataFrame:
    """The kept explanations whose status is ok: what gets simulated and scored."""
    return kept(explanations).filter(pl.col("status") == STATUS_OK)
