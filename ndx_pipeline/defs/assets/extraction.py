"""The subject-model stages: the corpus, and one step per run for one extraction pass (activation records and the
token table of the lookup baseline) with the explain / score splits of each unit's records (top_excerpts)."""

import dagster as dg
import polars as pl

from ndx_pipeline.core import contract as c
from ndx_pipeline.core import stages, validation
from ndx_pipeline.core.contract import LOOKUP_BASELINE
from ndx_pipeline.core.data.corpus import DEFAULT_CORPUS
from ndx_pipeline.core.progress import Progress
from ndx_pipeline.core.validation import ERROR, Check
from ndx_pipeline.defs.automation import FOLLOW_UPSTREAM, REFRESH_MATERIALIZED
from ndx_pipeline.defs.checks import CHECKS, check_specs
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


SUBJECT_MODEL_FILES = (c.ACTIVATION_RECORDS, c.TOKEN_TABLE)  # what only the subject model's pass can write


@dg.multi_asset(
    name=c.ACTIVATION_RECORDS, op_tags=step_tags(c.ACTIVATION_RECORDS), group_name=GROUP, pool=SUBJECT_MODEL_POOL,
    can_subset=True, backfill_policy=SINGLE_RUN,
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
        dg.AssetSpec(c.TOP_EXCERPTS, deps=[c.ACTIVATION_RECORDS], partitions_def=layers,
                     code_version=CODE_VERSIONS[c.TOP_EXCERPTS], automation_condition=FOLLOW_UPSTREAM,
                     description="Disjoint explain / score_top / score_random excerpts per unit (interleaved "
                                 "splits), and the calibration excerpts best-of-k chooses on; units that fired in too "
                                 "few windows (and dead ones) are left out. Split from the records in memory when "
                                 "they are written in the same step, else read from their files."),
    ],
    check_specs=check_specs(c.ACTIVATION_RECORDS, c.TOKEN_TABLE, c.TOP_EXCERPTS),
)
def activation_records(context: dg.AssetExecutionContext, subject_model: SubjectModelResource,
                       selection: SelectionResource, quality: QualityResource, storage: StorageResource):
    """One step for the three assets of the subject-model pass; it writes the files of the assets selected. The
    records and the token table come from one pass over the corpus; top_excerpts is a reshuffle of the records,
    split from the rows in memory right after they are written (reading 30 layers' records back took a third of
    the time after the pass) or, selected alone (a changed split count), from the records files."""
    selected = {key.to_user_string() for key in context.selected_asset_keys}
    out = Outputs(context, storage.path())
    excerpts = _Excerpts(context, out, selection, quality) if c.TOP_EXCERPTS in selected else None
    if not selected & set(SUBJECT_MODEL_FILES):
        for layer, done in ahead(layers_of(context), excerpts.split):
            excerpts.report(layer, done)
        yield out.result(c.TOP_EXCERPTS)
        return
    counted = LOOKUP_BASELINE in quality.baselines
    records_written, table_written = c.ACTIVATION_RECORDS in selected, c.TOKEN_TABLE in selected
    with bad_input_fails_the_run():
        quality.checked()
        extraction = stages.activation_records(
            read(storage.path(), c.CORPUS), subject_model.model, layers_of(context), units=selection.units,
            neurons=selection.neurons, neurons_per_layer=selection.neurons_per_layer, seed=selection.seed,
            dictionary=selection.dictionary, dictionary_hook=selection.dictionary_hook, top_k=selection.top_k,
            random_k=selection.random_k, quantile_k=selection.quantile_k, token_table=counted and table_written,
            device=subject_model.resolved_device(), dtype=subject_model.dtype, batch_size=subject_model.batch_size,
            window_tokens=subject_model.window_tokens, log=context.log.info)
    stats = extraction.stats
    random_k = min(selection.random_k, stats.windows)
    written = Progress("activation records written", len(extraction.layers), context.log.info, unit="layers")

    def build_and_write(item):  # on a worker thread: files and checks, nothing reported
        layer, found = item
        done = {}
        if records_written:
            records = found.records
            done.update(records=out.write_file(c.ACTIVATION_RECORDS, records, layer),
                        top_windows_ordered=validation.top_windows_ordered(records),
                        record_counts=validation.record_counts(records, found.units, selection.top_k, random_k))
        if table_written:
            table = found.token_table
            done.update(table=out.write_file(c.TOKEN_TABLE, table, layer), distinct_tokens=table["token"].n_unique(),
                        token_table_complete=validation.token_table_complete(table, found.records, counted))
        if excerpts:  # from the records just written, or (records not selected) from their file; else why not
            failed = [name for name in CHECKS[c.ACTIVATION_RECORDS] if name in done and _stops(Check(*done[name]))]
            try:
                done["excerpts"] = (f"activation_records check {', '.join(failed)} failed" if failed else
                                    excerpts.split(layer, found.records if records_written else None))
            except dg.Failure as failure:  # bad input for the split (counts the corpus cannot fill): records stand
                done["excerpts"] = failure.description
        found.release()  # a layer's rows are in memory only while its files are written
        return done

    withheld = {}
    for (layer, found), done in ahead(extraction.layers.items(), build_and_write):
        if records_written:
            out.written(c.ACTIVATION_RECORDS, layer, done["records"], neurons=len(found.units),
                        units=found.description, dead_units=found.dead,
                        tokens_processed=stats.tokens, windows=stats.windows,
                        tokens_per_second=round(stats.tokens_per_second, 1),
                        wall_seconds=round(stats.seconds, 2), subject_model=subject_model.model,
                        device=extraction.device, layers_in_this_pass=str(sorted(extraction.layers)))
            for check in CHECKS[c.ACTIVATION_RECORDS]:
                out.check(c.ACTIVATION_RECORDS, check, layer, done[check])
        if table_written:
            out.written(c.TOKEN_TABLE, layer, done["table"], counted=counted,
                        distinct_tokens=done["distinct_tokens"])
            out.check(c.TOKEN_TABLE, "token_table_complete", layer, done["token_table_complete"])
        if excerpts:
            if isinstance(done["excerpts"], str):
                withheld.setdefault(done["excerpts"], []).append(layer)
            else:
                excerpts.report(layer, done["excerpts"])
        written.advance()
    # the records and token table are materialized whatever became of the split: a failed records check stops their
    # layer here as a blocking check stops the steps after it, and after a bad split count only top_excerpts reruns
    yield from out.results(*(a for a in SUBJECT_MODEL_FILES if a in selected))
    if withheld:
        raise dg.Failure(description="; ".join(f"top_excerpts not written for layer{'s' if len(at) > 1 else ''} "
                                               f"{', '.join(map(str, at))}: {why}" for why, at in withheld.items()))
    if excerpts:
        yield out.result(c.TOP_EXCERPTS)


def _stops(check: Check) -> bool:
    """A failed check that stops its layer's data, as a blocking asset check does: ERROR severity."""
    return not check.passed and check.severity == ERROR


class _Excerpts:
    """top_excerpts of the layers of one step: `split` (on a worker thread: the file and its checks, nothing
    reported), then `report` (on the step's thread)."""

    def __init__(self, context: dg.AssetExecutionContext, out: Outputs, selection: SelectionResource,
                 quality: QualityResource):
        self.context, self.out, self.selection, self.quality = context, out, selection, quality

    def split(self, layer: int, records: pl.DataFrame | None = None) -> dict:
        """Split `records` (default: the layer's stored activation_records) and write the file."""
        if records is None:
            records = read(self.out.storage_dir, c.ACTIVATION_RECORDS, layer)
        sel = self.selection
        with bad_input_fails_the_run():
            frame = stages.top_excerpts(
                records, sel.explain_excerpts, sel.score_top_excerpts, sel.score_random_excerpts,
                self.quality.checked().calibration_top_excerpts, self.quality.calibration_random_excerpts)
        units = records.select("kind", "neuron")  # (not the wide rows: a filter copies every column it keeps)
        return {"file": self.out.write_file(c.TOP_EXCERPTS, frame, layer),
                "fired": units.filter(pl.col("kind") != c.DEAD)["neuron"].n_unique(),
                "dead": units.filter(pl.col("kind") == c.DEAD).height, "neurons": frame["neuron"].n_unique(),
                "splits_disjoint": validation.splits_disjoint(frame),
                "excerpt_counts": validation.excerpt_counts(frame, sel.explain_excerpts, sel.score_top_excerpts,
                                                            sel.score_random_excerpts)}

    def report(self, layer: int, done: dict) -> None:
        sparse = done["fired"] - done["neurons"]
        if sparse:
            self.context.log.info(f"layer {layer}: {sparse} of {done['fired']} units that fired did so in too few "
                                  "windows to fill the explain and score splits: left out")
        self.out.written(c.TOP_EXCERPTS, layer, done["file"], neurons=done["neurons"], too_sparse_units=sparse,
                         dead_units=done["dead"])
        for check in CHECKS[c.TOP_EXCERPTS]:
            self.out.check(c.TOP_EXCERPTS, check, layer, done[check])
