"""The subject-model stages: the corpus, one extraction pass per run (activation records and the token table of
the lookup baseline), and the explain / score splits of each neuron's records."""

import dagster as dg
import polars as pl

from ndx_pipeline.core import contract as c
from ndx_pipeline.core import stages, validation
from ndx_pipeline.core.contract import LOOKUP_BASELINE
from ndx_pipeline.core.data.corpus import DEFAULT_CORPUS
from ndx_pipeline.core.progress import Progress
from ndx_pipeline.defs.automation import FOLLOW_UPSTREAM, REFRESH_MATERIALIZED
from ndx_pipeline.defs.checks import check_specs
from ndx_pipeline.defs.materialize import (
    GROUP,
    SINGLE_RUN,
    SUBJECT_MODEL_POOL,
    Outputs,
    ahead,
    bad_input_fails_the_run,
    layers_of,
    read,
)
from ndx_pipeline.defs.partitions import layers
from ndx_pipeline.defs.queues import step_tags
from ndx_pipeline.defs.resources import (
    CorpusResource,
    QualityResource,
    SelectionResource,
    StorageResource,
    SubjectModelResource,
)
from ndx_pipeline.defs.versioning import CODE_VERSIONS


@dg.asset(name=c.CORPUS, op_tags=step_tags(c.CORPUS), group_name=GROUP, code_version=CODE_VERSIONS[c.CORPUS],
          description="The text corpus, one row per document.")
def corpus(context: dg.AssetExecutionContext, corpus_source: CorpusResource, storage: StorageResource):
    with bad_input_fails_the_run():
        frame = stages.corpus(corpus_source.path)
    out = Outputs(context, storage.path())
    out.write(c.CORPUS, frame, documents=len(frame), characters=int(frame["text"].str.len_chars().sum()),
              source=corpus_source.path or DEFAULT_CORPUS)
    return out.result(c.CORPUS)


@dg.multi_asset(
    name=c.ACTIVATION_RECORDS, op_tags=step_tags(c.ACTIVATION_RECORDS), group_name=GROUP, pool=SUBJECT_MODEL_POOL,
    can_subset=False, backfill_policy=SINGLE_RUN,
    specs=[
        dg.AssetSpec(c.ACTIVATION_RECORDS, deps=[c.CORPUS], partitions_def=layers,
                     code_version=CODE_VERSIONS[c.ACTIVATION_RECORDS], automation_condition=REFRESH_MATERIALIZED,
                     description="Per unit (an MLP neuron's positive or negative side, or a dictionary latent): top "
                                 "windows by max activation, a seeded random sample, activation-quantile samples, "
                                 "and the unit's mean/variance/max over the corpus; one `dead` row for a unit that "
                                 "never fired."),
        dg.AssetSpec(c.TOKEN_TABLE, deps=[c.CORPUS], partitions_def=layers,
                     code_version=CODE_VERSIONS[c.TOKEN_TABLE], automation_condition=REFRESH_MATERIALIZED,
                     description="Per neuron × token text: count and activation sum over the corpus, counted in the "
                                 "same pass (the lookup-table baseline); no rows when that baseline is off."),
    ],
    check_specs=check_specs(c.ACTIVATION_RECORDS, c.TOKEN_TABLE),
)
def activation_records(context: dg.AssetExecutionContext, subject_model: SubjectModelResource,
                       selection: SelectionResource, quality: QualityResource, storage: StorageResource):
    counted = LOOKUP_BASELINE in quality.baselines
    with bad_input_fails_the_run():
        quality.checked()
        extraction = stages.activation_records(
            read(storage.path(), c.CORPUS), subject_model.model, layers_of(context), units=selection.units,
            neurons=selection.neurons, neurons_per_layer=selection.neurons_per_layer, seed=selection.seed,
            dictionary=selection.dictionary, dictionary_hook=selection.dictionary_hook, top_k=selection.top_k,
            random_k=selection.random_k, quantile_k=selection.quantile_k, token_table=counted,
            device=subject_model.resolved_device(), dtype=subject_model.dtype, batch_size=subject_model.batch_size,
            window_tokens=subject_model.window_tokens, log=context.log.info)
    out = Outputs(context, storage.path())
    stats = extraction.stats
    random_k = min(selection.random_k, stats.windows)
    written = Progress("activation records written", len(extraction.layers), context.log.info, unit="layers")

    def build_and_write(item):  # on a worker thread: files and checks, nothing reported
        layer, found = item
        records, table = found.records, found.token_table
        done = {"records": out.write_file(c.ACTIVATION_RECORDS, records, layer),
                "table": out.write_file(c.TOKEN_TABLE, table, layer),
                "top_windows_ordered": validation.top_windows_ordered(records),
                "record_counts": validation.record_counts(records, found.units, selection.top_k, random_k),
                "token_table_complete": validation.token_table_complete(table, records, counted),
                "distinct_tokens": table["token"].n_unique()}
        found.release()  # a layer's rows are in memory only while its files are written
        return done

    for (layer, found), done in ahead(extraction.layers.items(), build_and_write):
        out.written(c.ACTIVATION_RECORDS, layer, done["records"], neurons=len(found.units),
                    units=found.description, dead_units=found.dead,
                    tokens_processed=stats.tokens, windows=stats.windows,
                    tokens_per_second=round(stats.tokens_per_second, 1),
                    wall_seconds=round(stats.seconds, 2), subject_model=subject_model.model,
                    device=extraction.device, layers_in_this_pass=str(sorted(extraction.layers)))
        for check in ("top_windows_ordered", "record_counts"):
            out.check(c.ACTIVATION_RECORDS, check, layer, done[check])
        out.written(c.TOKEN_TABLE, layer, done["table"], counted=counted, distinct_tokens=done["distinct_tokens"])
        out.check(c.TOKEN_TABLE, "token_table_complete", layer, done["token_table_complete"])
        written.advance()
    yield from out.results(c.ACTIVATION_RECORDS, c.TOKEN_TABLE)


@dg.asset(name=c.TOP_EXCERPTS, op_tags=step_tags(c.TOP_EXCERPTS), group_name=GROUP, deps=[c.ACTIVATION_RECORDS],
          partitions_def=layers, backfill_policy=SINGLE_RUN, code_version=CODE_VERSIONS[c.TOP_EXCERPTS],
          automation_condition=FOLLOW_UPSTREAM, check_specs=check_specs(c.TOP_EXCERPTS),
          description="Disjoint explain / score_top / score_random excerpts per unit (interleaved splits), and "
                      "the calibration excerpts best-of-k chooses on; units that fired in too few windows (and dead "
                      "ones) are left out.")
def top_excerpts(context: dg.AssetExecutionContext, selection: SelectionResource, quality: QualityResource,
                 storage: StorageResource):
    out = Outputs(context, storage.path())

    def split_and_write(layer):  # on a worker thread: the file and its checks, nothing reported
        records = read(storage.path(), c.ACTIVATION_RECORDS, layer)
        with bad_input_fails_the_run():
            frame = stages.top_excerpts(
                records, selection.explain_excerpts, selection.score_top_excerpts, selection.score_random_excerpts,
                quality.checked().calibration_top_excerpts, quality.calibration_random_excerpts)
        units = records.select("kind", "neuron")  # (not the wide rows: a filter copies every column it keeps)
        return {"file": out.write_file(c.TOP_EXCERPTS, frame, layer),
                "fired": units.filter(pl.col("kind") != c.DEAD)["neuron"].n_unique(),
                "dead": units.filter(pl.col("kind") == c.DEAD).height, "neurons": frame["neuron"].n_unique(),
                "splits_disjoint": validation.splits_disjoint(frame),
                "excerpt_counts": validation.excerpt_counts(frame, selection.explain_excerpts,
                                                            selection.score_top_excerpts,
                                                            selection.score_random_excerpts)}

    for layer, done in ahead(layers_of(context), split_and_write):
        sparse = done["fired"] - done["neurons"]
        if sparse:
            context.log.info(f"layer {layer}: {sparse} of {done['fired']} units that fired did so in too few windows "
                             "to fill the explain and score splits: left out")
        out.written(c.TOP_EXCERPTS, layer, done["file"], neurons=done["neurons"], too_sparse_units=sparse,
                    dead_units=done["dead"])
        for check in ("splits_disjoint", "excerpt_counts"):
            out.check(c.TOP_EXCERPTS, check, layer, done[check])
    return out.result(c.TOP_EXCERPTS)
