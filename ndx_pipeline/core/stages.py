"""The pipeline's stages as plain functions: frames in, frames (and a few counts) out.

The Dagster assets (`ndx_pipeline/defs/assets`), the CLI and the benchmarks all run the method through these, so
there is one copy of each stage's logic. No function here reads or writes files or knows about Dagster; each takes
the settings it needs as arguments and a `log` callable for progress lines.

    corpus ─► activation_records (+ token_table) ─► top_excerpts ─► explanations (+ baseline_explanations,
    calibration_simulations) ─► simulations (+ baseline_simulations) ─► scores
    top_excerpts ─► scorer_excerpts ─► <scorer>_judgements + <scorer>_scores (detection, fuzzing, embedding; each
    beside the simulation score, reading the explanations and baseline_explanations)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import polars as pl

from ndx_pipeline.core import contract
from ndx_pipeline.core.contract import (
    BASELINE_EXPLANATION_SCHEMA,
    CALIBRATION,
    CONTROL_BASELINES,
    DICTIONARY_LATENT,
    EXPLAIN,
    LOOKUP_BASELINE,
    RANDOM_BASELINE,
    SIMULATED_BASELINES,
    SIMULATION_SCHEMA,
    TOKEN_LIST_BASELINE,
    TOKEN_TABLE_SCHEMA,
)
from ndx_pipeline.core.data import forward_pass
from ndx_pipeline.core.data import output_tokens as out_tokens
from ndx_pipeline.core.data.corpus import read_corpus
from ndx_pipeline.core.data.dictionary_formats import decoder_rows
from ndx_pipeline.core.data.excerpts import calibration_excerpts, split_excerpts
from ndx_pipeline.core.data.planted import PLANTED_UNIT, PlantedUnits, planted_selection
from ndx_pipeline.core.data.planted import RULES as PLANTED_RULES
from ndx_pipeline.core.data.record_frames import records_frame, token_table_frame
from ndx_pipeline.core.data.selection import ExtractionStats
from ndx_pipeline.core.data.subject_model import (
    TRAINED,
    check_layers,
    check_weights,
    hook_width,
    load_subject_model,
    load_tokenizer,
    mlp_width,
)
from ndx_pipeline.core.data.units import (
    DICTIONARY,
    PLANTED,
    POLARITIES,
    POSITIVE,
    UNIT_CHOICES,
    DictionaryLatents,
    MlpNeurons,
    UnitSet,
    dictionaries_by_layer,
    neurons_of_layer,
)
from ndx_pipeline.core.data.windows import TokenTexts, tokenize_windows
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.method import baselines as baselines_mod
from ndx_pipeline.core.method import best_of_k, controls, judging
from ndx_pipeline.core.method.explainer import (
    MAX_EXPLANATION_TOKENS,
    TEMPERATURE,
    explanation_work,
)
from ndx_pipeline.core.method.scorers import Scorer, SimulationScorer
from ndx_pipeline.core.method.scoring import with_baselines
from ndx_pipeline.core.method.token_list import explain_token_lists, token_list_work
from ndx_pipeline.core.method.work import run_together
from ndx_pipeline.core.progress import Log, Progress, quiet

# ---------------------------------------------------------------------------------------------------------- corpus


def corpus(source: str | None = None) -> pl.DataFrame:
    """The corpus: one row per document (`doc_id`, `source`, `text`); the bundled corpus when `source` is None."""
    return read_corpus(source)


# ---------------------------------------------------------------------------------------------- activation records


class LayerRecords:
    """One layer's extraction output. Its frames are built from the layer's selection on first use and dropped with
    it by `release()`, so a caller that writes layer after layer holds one layer's rows at a time (a whole model's
    records held at once come to gigabytes)."""

    def __init__(self, units: list[int], build: Callable[[], tuple[pl.DataFrame, pl.DataFrame]],
                 description: str = "", dead: int = 0, failed: dict[int, str] | None = None):
        self.units = units  # the unit ids (`neuron` column)
        self.description = description  # the unit set in words: how many of what kind, from where
        self.dead = dead  # units that never fired (one `dead` record each, not explained)
        # unit id → why it failed: its activation was not finite somewhere (one `failed` record each, not explained)
        self.failed = failed or {}
        self._build = build
        self._frames: tuple[pl.DataFrame, pl.DataFrame] | None = None

    def _built(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        if self._frames is None:
            if self._build is None:
                raise RuntimeError("this layer's records were released after they were written.")
            self._frames = self._build()
        return self._frames

    @property
    def records(self) -> pl.DataFrame:
        return self._built()[0]

    @property
    def token_table(self) -> pl.DataFrame:
        """Empty when the lookup baseline is off."""
        return self._built()[1]

    def release(self) -> None:
        """Drop the frames and the selection they come from."""
        self._frames = self._build = None


@dataclass
class Extraction:
    layers: dict[int, LayerRecords]
    stats: ExtractionStats  # tokens, windows, seconds, tokens_per_second of the pass
    device: str
    joint: dict[str, dict[int, LayerRecords]] = field(default_factory=dict)  # the `also` choices' layers, by name


@dataclass(frozen=True)
class UnitChoice:
    """What one extraction keeps: which units of which layers (see `unit_sets`) and how many windows of each kind.
    Several choices read in one pass (`activation_records(also=...)`) share the subject model's forward passes."""

    layers: tuple[int, ...]
    units: str = POSITIVE
    neurons: tuple[int, ...] | None = None
    neurons_per_layer: int = 6
    seed: int = 0
    dictionary: str | None = None
    dictionary_hook: str | None = None
    top_k: int = 20
    random_k: int = 20
    quantile_k: int = 4
    token_table: bool = True
    subject_weights: str = TRAINED

    def unit_sets(self, model: str | None) -> dict[int, UnitSet]:
        return unit_sets(model, check_layers(model, self.layers), units=self.units, neurons=self.neurons,
                         neurons_per_layer=self.neurons_per_layer, seed=self.seed, dictionary=self.dictionary,
                         dictionary_hook=self.dictionary_hook)

    def keep(self) -> forward_pass.Keep:
        return forward_pass.Keep(self.top_k, self.random_k, self.seed, self.token_table)

    def pass_key(self) -> tuple:
        """What choices read in one pass agree on: the model's weights (a random-weight model is seeded) and what
        orders the pass's windows (the quantile pilot's draw)."""
        random = self.subject_weights != TRAINED
        return (self.quantile_k, self.seed if self.quantile_k or random else None, self.subject_weights)


def unit_sets(model: str | None, layers: Sequence[int], *, units: str = POSITIVE, neurons: Sequence[int] | None = None,
              neurons_per_layer: int = 6, seed: int = 0, dictionary: str | None = None,
              dictionary_hook: str | None = None) -> dict[int, UnitSet]:
    """{layer: UnitSet} of a run: MLP neurons on one side or both (`units` = positive | negative | both), or the
    latents of the dictionary (or folder of dictionaries, one per layer) at `dictionary` (`units` = dictionary).
    `neurons` / `neurons_per_layer` choose the neurons or latents (neurons_per_layer -1: all of them)."""
    if units == DICTIONARY:
        if not dictionary:
            raise NdxInputError("units=dictionary needs a dictionary: give the path of its folder (or of a folder "
                                "holding one folder per layer).")
        found = dictionaries_by_layer(dictionary, dictionary_hook, layers)
        out = {}
        for layer in layers:
            d = found[layer]
            d.check_fits(hook_width(model, d.hook), f"{d.hook} of layer {layer}")
            latents = neurons_of_layer(layer, d.n_latents, neurons, neurons_per_layer, seed, what="latents")
            out[layer] = DictionaryLatents(layer, d, latents)
        return out
    if dictionary:
        raise NdxInputError(f"a dictionary was given but units={units!r}: set units=dictionary to explain its "
                            "latents, or leave the dictionary out.")
    if units == PLANTED:  # the same rules at every layer: the layer only says where the records are kept
        return {layer: PlantedUnits(layer, neurons_of_layer(layer, len(PLANTED_RULES), neurons, neurons_per_layer,
                                                            seed, what="planted units"))
                for layer in layers}
    if units not in POLARITIES:
        raise NdxInputError(f"units={units!r} is not known: use one of {', '.join(UNIT_CHOICES)}.")
    width = mlp_width(model)
    return {layer: MlpNeurons(layer, neurons_of_layer(layer, width, neurons, neurons_per_layer, seed), units)
            for layer in layers}


def activation_records(documents: pl.DataFrame, model: str | None, layers: Sequence[int], *,
                       units: str = POSITIVE, neurons: Sequence[int] | None = None, neurons_per_layer: int = 6,
                       seed: int = 0, dictionary: str | None = None, dictionary_hook: str | None = None,
                       top_k: int = 20, random_k: int = 20, quantile_k: int = 4, token_table: bool = True,
                       device: str = "cpu", dtype: str = "float32", batch_size: int = 16, window_tokens: int = 64,
                       subject_weights: str = TRAINED, also: dict[str, UnitChoice] | None = None,
                       log: Log = quiet) -> Extraction:
    """One pass of the subject model over the corpus for every layer of `layers`: per chosen unit (see
    `unit_sets`) its top, random and quantile windows and moments, and (token_table) the per-token table of the
    lookup baseline. `also`: other choices (name → UnitChoice, e.g. other variants' unit sets) read in the same
    pass, their records in `Extraction.joint[name]`, each what a pass of its own would keep. subject_weights
    "random": the subject model re-initialized with `seed` (the random-weight control; `load_subject_model`)."""
    main = UnitChoice(tuple(layers), units, None if neurons is None else tuple(neurons), neurons_per_layer, seed,
                      dictionary, dictionary_hook, top_k, random_k, quantile_k, token_table,
                      check_weights(subject_weights))
    choices = {None: main, **(also or {})}
    for name, choice in choices.items():
        if choice.pass_key() != main.pass_key():
            raise ValueError(f"{name} cannot share this pass: its model weights, quantile_k or seed differ.")
    slots: dict[tuple, UnitSet] = {}
    planted: dict[tuple, PlantedUnits] = {}  # no model: their activations are rules over the tokens
    keep: dict[tuple, forward_pass.Keep] = {}
    described: dict[str, list[str]] = {}
    for name, choice in choices.items():
        for layer, unit_set in choice.unit_sets(model).items():
            (planted if isinstance(unit_set, PlantedUnits) else slots)[name, layer] = unit_set
            keep[name, layer] = choice.keep()
            described.setdefault(unit_set.describe_set(), []).append(str(layer) if name is None else f"{layer} "
                                                                                                   f"({name})")
    if slots:
        log(f"loading subject model {model or 'bundled'} on {device}"
        + (f", weights re-initialized (seed {seed}): the random-weight control" if subject_weights != TRAINED else ""))
        subject, tokenizer = load_subject_model(model, device, dtype, subject_weights, seed)
    else:
        subject, tokenizer = None, load_tokenizer(model)
    windows = tokenize_windows(tokenizer, documents["doc_id"].to_list(), documents["text"].to_list(), window_tokens)
    log(f"{windows.total_tokens} tokens in {len(windows)} windows; "
        + "; ".join(f"layers {', '.join(where)}: {what}" for what, where in described.items()))
    texts = TokenTexts(tokenizer)
    selections, stats = {}, None
    if slots:
        progress = Progress("activations", windows.total_tokens, log, unit="tokens")
        selections, stats = forward_pass.extract(subject, tokenizer, windows, slots, top_k, random_k, seed, batch_size,
                                        lambda done, total, seconds: progress.set(done), quantile_k=quantile_k,
                                        keep=keep)
    for slot, units_of in planted.items():
        progress = Progress(f"planted units of layer {slot[1]}", windows.total_tokens, log, unit="tokens")
        k = keep[slot]
        selections[slot], planted_stats = planted_selection(windows, texts, units_of, k.top_k, k.random_k,
                                                            quantile_k, k.seed, k.token_table,
                                                            progress=lambda done, total, s: progress.set(done))
        stats = stats or planted_stats  # a model pass's figures when there is one; planted units take none
    slots.update(planted)
    out: dict = {name: {} for name in choices}
    for (name, layer), unit_set in slots.items():
        selection, counted = selections.pop((name, layer)), keep[name, layer].token_table

        def build(layer=layer, unit_set=unit_set, selection=selection, counted=counted):
            table = (token_table_frame(layer, selection, texts) if counted
                     else pl.DataFrame(schema=TOKEN_TABLE_SCHEMA))
            return records_frame(layer, selection, windows, texts, unit_set), table

        failed = {unit_set.ids[u]: f"activation not finite on {count} tokens, first in window {first}"
                  for u, (count, first) in selection.failed().items()}
        dead = int((~selection.fired()).sum()) - len(failed)
        where = f"layer {layer}" if name is None else f"layer {layer} ({name})"
        if dead:
            log(f"{where}: {dead} of {len(unit_set.ids)} units never fired over the corpus (recorded as dead, not "
                "explained)")
        if failed:
            log(f"{where}: {len(failed)} of {len(unit_set.ids)} units had activations that are not finite (NaN or "
                "±inf; recorded as failed, not explained): "
                + "; ".join(f"unit {u}: {why}" for u, why in list(failed.items())[:10]))
        out[name][layer] = LayerRecords(unit_set.ids, build, unit_set.describe_set(), dead, failed)
    return Extraction(out.pop(None), stats, device, out)


# ---------------------------------------------------------------------------------------------------- output tokens


UNIT_FIELDS = ("neuron", "unit_kind", "unit_source")  # what `output_tokens` reads of the records


def output_tokens(records: dict[int, pl.DataFrame], model: str | None, *, dictionary: str | None = None,
                  dictionary_hook: str | None = None, subject_weights: str = TRAINED, seed: int = 0,
                  k: int = out_tokens.OUTPUT_TOKENS_K, log: Log = quiet) -> dict[int, pl.DataFrame]:
    """Per layer of `records` (its activation records): the tokens each unit's output direction promotes and
    suppresses (`core/data/output_tokens.py`), from the subject model's weights (re-initialized with `seed` for the
    random-weight control, as the extraction read them). Planted units have no output direction: no rows."""
    units = {layer: frame.select(UNIT_FIELDS).unique("neuron").sort("neuron")
             for layer, frame in records.items()}
    wanted = {layer: u for layer, u in units.items() if len(u) and u["unit_kind"][0] != PLANTED_UNIT}
    out = {layer: pl.DataFrame(schema=contract.OUTPUT_TOKENS_SCHEMA) for layer in records}
    if not wanted:
        return out
    log(f"loading subject model {model or 'bundled'} with its unembedding for the units' output tokens")
    subject, tokenizer = load_subject_model(model, weights=check_weights(subject_weights), seed=seed, head=True)
    unembedding = out_tokens.Unembedding.of(subject)
    latent_layers = [layer for layer, u in wanted.items() if u["unit_kind"][0] == DICTIONARY_LATENT]
    dictionaries = dictionaries_by_layer(dictionary, dictionary_hook, latent_layers) if latent_layers else {}
    progress = Progress("output tokens", sum(len(u) for u in wanted.values()), log, unit="units")
    for layer, u in wanted.items():
        ids, kind = u["neuron"].to_list(), u["unit_kind"][0]
        if kind == DICTIONARY_LATENT:
            directions = out_tokens.latent_directions(subject, layer, decoder_rows(dictionaries[layer].path, ids))
        else:
            directions = out_tokens.neuron_directions(subject, layer, ids)
        out[layer] = out_tokens.output_tokens_frame(layer, ids, directions, unembedding, tokenizer, kind=kind,
                                                    source=u["unit_source"][0], k=k)
        progress.advance(len(ids))
    return out


# ---------------------------------------------------------------------------------------------------- top excerpts


def top_excerpts(records: pl.DataFrame, explain: int = 5, score_top: int = 5, score_random: int = 5,
                 calibration_top: int = 0, calibration_random: int = 0, scope: str | None = None) -> pl.DataFrame:
    """The explain / score_top / score_random splits of each unit's records (disjoint), plus the calibration
    split best-of-k chooses on when its counts are above 0 (disjoint from all three). Units that fired in too few
    windows to fill the splits (and dead ones) are left out: nothing downstream explains them. Excerpt ids are
    prefixed with `scope` (the variant: `contract.scoped`)."""
    frame = split_excerpts(records, explain, score_top, score_random)
    if calibration_top or calibration_random:  # for the units the splits keep (not those too sparse to explain)
        kept = frame.select("layer", "neuron").unique()
        frame = pl.concat([frame, calibration_excerpts(records, calibration_top, calibration_random, kept)])
    return contract.scoped(frame, "excerpt_id", scope)


# ---------------------------------------------------------------------------------------------------- explanations


@dataclass
class Explained:
    explanations: pl.DataFrame
    baseline_explanations: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(
        schema=BASELINE_EXPLANATION_SCHEMA))
    calibration_simulations: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=SIMULATION_SCHEMA))


def explanations(excerpts: pl.DataFrame, explainer, *, candidates: int = 1, chooser=None,
                 baselines: Sequence[str] = (), token_list_explainer: str = "llm", seed: int = 0,
                 max_tokens: int = MAX_EXPLANATION_TOKENS, temperature: float = TEMPERATURE, digest: bool = True,
                 output_tokens: pl.DataFrame | None = None,
                 simulator_mode: str = "all_at_once", scope: str | None = None, what: str = "explanations",
                 planted: bool = False, log: Log = quiet) -> Explained:
    """One explanation per neuron by the `explainer` backend; with `candidates` = k > 1, k candidates each,
    simulated by `chooser` on the calibration excerpts and the best kept (all stored, the kept one `selected`).
    The random and token-list baselines of `baselines` get their explanations here too, to be simulated beside
    ours (`token_list_explainer`: "llm" — the explainer reads only the strongest tokens — or "template").

    `excerpts` may hold several layers: everything asked of the explainer (every candidate of every neuron, and
    the token-list baseline) goes out in one wave; then best-of-k's calibration simulations in a second.
    Explanation ids are prefixed with `scope` (the variant: `contract.scoped`). `planted`: the units are planted
    (`core/data/planted.py`): each also gets its true and a wrong explanation as baselines (`method/controls.py`).
    `output_tokens` (rows of that asset, `quality.explainer_logits`): each unit's promoted and suppressed tokens
    are listed under its excerpts."""
    wanted = [b for b in baselines if b in SIMULATED_BASELINES]
    outputs = None if output_tokens is None else {
        (int(r["layer"]), int(r["neuron"])): (r["promoted_tokens"], r["suppressed_tokens"])
        for r in output_tokens.iter_rows(named=True)}
    if candidates > 1:
        calibration = excerpts.filter(pl.col("split") == CALIBRATION)
        if calibration.is_empty():
            raise NdxInputError(
                f"best-of-k (explanation_candidates={candidates}) needs calibration excerpts, and top_excerpts has "
                "none: set calibration_top_excerpts or calibration_random_excerpts above 0.")
        if chooser is None:
            raise ValueError("best-of-k needs a simulator backend (chooser) to score the candidates")
        ours = best_of_k.candidates_work(excerpts, explainer, candidates, max_tokens, temperature, seed, digest,
                                         outputs)
    else:
        ours = explanation_work(excerpts, explainer, max_tokens, temperature, (seed,), digest, outputs)
    works = [ours]
    token_list = None
    if TOKEN_LIST_BASELINE in wanted:
        if token_list_explainer == "llm":
            works.append(token_list_work(excerpts, explainer, max_tokens=max_tokens, temperature=temperature,
                                         seed=seed))
        else:
            token_list = explain_token_lists(excerpts, None)
    found, *rest = run_together(explainer, works, Progress(what, 0, log, unit="requests"))
    token_list = rest[0] if rest else token_list
    found = contract.scoped(found, "explanation_id", scope)
    out = Explained(found)
    if candidates > 1:
        out.explanations, out.calibration_simulations = best_of_k.select_best(
            found, calibration, chooser, mode=simulator_mode,
            progress=Progress(f"{what}: best-of-{candidates} calibration", 0, log, unit="excerpts"))
    if wanted:
        random = (baselines_mod.random_explanations(out.explanations, seed) if RANDOM_BASELINE in wanted else None)
        out.baseline_explanations = contract.scoped(baselines_mod.as_baselines(random, token_list),
                                                    "explanation_id", scope)
    if planted:
        known = contract.scoped(controls.planted_explanations(out.explanations), "explanation_id", scope)
        out.baseline_explanations = pl.concat([out.baseline_explanations.select(list(BASELINE_EXPLANATION_SCHEMA)),
                                               known]).sort("layer", "neuron", "baseline")
    return out


# ----------------------------------------------------------------------------------------------------- simulations


@dataclass
class Simulated:
    simulations: pl.DataFrame
    baseline_simulations: pl.DataFrame


def simulations(explanations: pl.DataFrame, baseline_explanations: pl.DataFrame, excerpts: pl.DataFrame,
                simulator, *, mode: str = "all_at_once", what: str = "simulations", log: Log = quiet) -> Simulated:
    """Every scored excerpt simulated from each neuron's kept explanation (and its calibration excerpts, for the
    calibrated score), and from each baseline explanation, the same way — all in one wave (the frames may hold
    several layers)."""
    ours = SimulationScorer(mode, calibrated=True).judgements(explanations, excerpts, simulator)
    theirs = SimulationScorer(mode).judgements(baseline_explanations, excerpts, simulator)
    found, baseline = run_together(simulator, [ours, theirs], Progress(what, 0, log, unit="excerpts"))
    return Simulated(found, baseline)


# ---------------------------------------------------------------------------------------------------------- scores


@dataclass
class Scored:
    scores: pl.DataFrame
    missing: dict[str, str]  # baseline → why it has no inputs (its column is NaN)


def scores(simulations: pl.DataFrame, explanations: pl.DataFrame, *, excerpts: pl.DataFrame,
           baselines: Sequence[str] = (), baseline_explanations: pl.DataFrame | None = None,
           baseline_simulations: pl.DataFrame | None = None, token_table: pl.DataFrame | None = None,
           lookup_held_out: bool = True) -> Scored:
    """The pooled Pearson score of each neuron's kept explanation, with a `baseline_<name>` column per baseline of
    `baselines` scored on the same excerpts. A baseline whose inputs were not made (its setting was off when the
    upstream stage ran) gets a column of NaN and a reason in `missing`, never another run's leftovers."""
    scorer = SimulationScorer()
    found, missing = {}, {}
    simulated = [b for b in baselines if b in SIMULATED_BASELINES]
    for name in simulated:
        rows = (baseline_explanations.filter(pl.col("baseline") == name)
                if baseline_explanations is not None else pl.DataFrame())
        if rows.is_empty():
            missing[name] = "the explanations stage made no explanations for it (its setting was off)"
        else:
            found[name] = scorer.score(baseline_simulations, rows)
    for name in CONTROL_BASELINES:  # planted units' true and wrong explanations, whenever they were made
        rows = (baseline_explanations.filter(pl.col("baseline") == name)
                if baseline_explanations is not None and len(baseline_explanations) else pl.DataFrame())
        if not rows.is_empty():
            found[name] = scorer.score(baseline_simulations, rows)
    if LOOKUP_BASELINE in baselines:
        if token_table is None or token_table.is_empty():
            missing[LOOKUP_BASELINE] = "activation_records counted no token table (the lookup baseline was off)"
        else:
            found.update(baselines_mod.baseline_scores(pl.DataFrame(), None, token_table, excerpts, lookup_held_out))
    frame = with_baselines(scorer.score(simulations, explanations), found)
    for name in missing:
        frame = frame.with_columns(pl.lit(float("nan")).alias(contract.baseline_column(name)))
    return Scored(frame, missing)


# --------------------------------------------------------------------------------------------------------- scorers


def scorer_excerpts(records: pl.DataFrame, excerpts: pl.DataFrame, count: int = 5,
                    scope: str | None = None, left_out: dict | None = None) -> pl.DataFrame:
    """Per explained unit, `count` activating and `count` non-activating windows that neither the explainer nor
    best-of-k saw (`judging.held_out_excerpts`): what the detection, fuzzing and embedding scorers judge. Excerpt
    ids are prefixed with `scope` (the variant). `left_out`: see `held_out_excerpts` (units with too few)."""
    explained = excerpts.filter(pl.col("split") == EXPLAIN).select("layer", "neuron").unique()
    held = judging.held_out_excerpts(records.join(explained, on=["layer", "neuron"], how="semi"), excerpts, count,
                                     left_out)
    return contract.scoped(held, "excerpt_id", scope)


@dataclass
class Judged:
    judgements: pl.DataFrame  # one row per explanation (ours and the baselines') × excerpt shown
    scores: pl.DataFrame  # one row per neuron, with the baselines' scores beside ours


def judged(scorer: Scorer, explanations: pl.DataFrame, baseline_explanations: pl.DataFrame,
           excerpts: pl.DataFrame, backend, *, what: str = "judgements", log: Log = quiet) -> Judged:
    """Every kept explanation and every baseline explanation judged by `scorer` on the held-out `excerpts`, in
    one wave through `backend` (the scorer LLM, or the embedder for the embedding scorer; the frames may hold
    several layers), then scored."""
    ours = scorer.judgements(explanations, excerpts, backend)
    theirs = scorer.judgements(baseline_explanations, excerpts, backend)
    found = pl.concat(run_together(backend, [ours, theirs], Progress(what, 0, log, unit=scorer.unit)))
    return Judged(found, judging.scores_with_baselines(found, explanations, baseline_explanations, scorer.score))
