"""The subject-model stages: the corpus, and one step per run for one extraction pass (activation records and the
token table of the lookup baseline) with the explain / score splits of each unit's records (top_excerpts)."""

import json
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import dagster as dg
import polars as pl

from ndx_pipeline.core import stages, validation
from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    CORPUS,
    DEAD,
    FAILED_UNIT,
    LOOKUP_BASELINE,
    TOKEN_TABLE,
    TOP_EXCERPTS,
    empty,
)
from ndx_pipeline.core.data.corpus import DEFAULT_CORPUS
from ndx_pipeline.core.data.units import PLANTED
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.progress import Progress
from ndx_pipeline.core.stages import LayerRecords
from ndx_pipeline.core.storage import asset_path, joint_extraction_dir, write_parquet_atomic, write_text_atomic
from ndx_pipeline.core.validation import ERROR, Check
from ndx_pipeline.core.variants import extraction_key
from ndx_pipeline.defs.automation import FOLLOW_UPSTREAM, REFRESH_MATERIALIZED
from ndx_pipeline.defs.checks import CHECKS, check_specs
from ndx_pipeline.defs.materialize import (
    EXTRACTION_GROUP,
    SINGLE_RUN,
    SUBJECT_MODEL_POOL,
    Outputs,
    VariantSettings,
    ahead,
    bad_input_fails_the_run,
    layers_of,
    one_writer,
    read,
    variant_of,
)
from ndx_pipeline.defs.metadata import file_digest
from ndx_pipeline.defs.partitions import EXTRACT_WITH_TAG, VARIANT, layer_variant, partition_key
from ndx_pipeline.defs.queues import step_tags
from ndx_pipeline.defs.resources import (
    CorpusResource,
    QualityResource,
    SelectionResource,
    StorageResource,
    SubjectModelResource,
)
from ndx_pipeline.defs.versioning import CODE_VERSIONS, METHOD_REVISIONS, with_settings


@dg.asset(name=CORPUS, op_tags=step_tags(CORPUS), group_name=EXTRACTION_GROUP, code_version=CODE_VERSIONS[CORPUS],
          description="The text corpus, one row per document.")
def corpus(context: dg.AssetExecutionContext, corpus_source: CorpusResource, storage: StorageResource):
    with bad_input_fails_the_run():
        frame = stages.corpus(corpus_source.path)
    out = Outputs(context, storage.path())
    out.write(CORPUS, frame, documents=len(frame), characters=int(frame["text"].str.len_chars().sum()),
              source=corpus_source.path or DEFAULT_CORPUS)
    return out.result(CORPUS)


SUBJECT_MODEL_FILES = (ACTIVATION_RECORDS, TOKEN_TABLE)  # what only the subject model's pass can write


@dg.multi_asset(
    name=ACTIVATION_RECORDS, op_tags=step_tags(ACTIVATION_RECORDS), group_name=EXTRACTION_GROUP,
    pool=SUBJECT_MODEL_POOL, can_subset=True, backfill_policy=SINGLE_RUN,
    specs=[
        dg.AssetSpec(ACTIVATION_RECORDS, deps=with_settings(ACTIVATION_RECORDS, [CORPUS]),
                     partitions_def=layer_variant,
                     code_version=CODE_VERSIONS[ACTIVATION_RECORDS], automation_condition=REFRESH_MATERIALIZED,
                     description="Per unit (an MLP neuron's positive or negative side, or a dictionary latent): top "
                                 "windows by max activation, a seeded random sample, activation-quantile samples, "
                                 "and the unit's mean/variance/max over the corpus; one `dead` row for a unit that "
                                 "never fired. Shared (one file, hard-linked) by the variants whose extraction "
                                 "settings are equal."),
        dg.AssetSpec(TOKEN_TABLE, deps=with_settings(TOKEN_TABLE, [CORPUS]), partitions_def=layer_variant,
                     code_version=CODE_VERSIONS[TOKEN_TABLE], automation_condition=REFRESH_MATERIALIZED,
                     description="Per neuron × token text: count and activation sum over the corpus, counted in the "
                                 "same pass (the lookup-table baseline); no rows when that baseline is off."),
        dg.AssetSpec(TOP_EXCERPTS, deps=with_settings(TOP_EXCERPTS, [ACTIVATION_RECORDS]),
                     partitions_def=layer_variant,
                     code_version=CODE_VERSIONS[TOP_EXCERPTS], automation_condition=FOLLOW_UPSTREAM,
                     description="Disjoint explain / score_top / score_random excerpts per unit (interleaved "
                                 "splits), and the calibration excerpts best-of-k chooses on; units that fired in too "
                                 "few windows (and dead ones) are left out. Split from the records in memory when "
                                 "they are written in the same step, else read from their files."),
    ],
    check_specs=check_specs(ACTIVATION_RECORDS, TOKEN_TABLE, TOP_EXCERPTS),
)
@one_writer
def activation_records(context: dg.AssetExecutionContext, subject_model: SubjectModelResource,
                       selection: SelectionResource, quality: QualityResource, storage: StorageResource):
    """One step for the three assets of the subject-model pass; it writes the files of the assets selected. The
    records and the token table come from one pass over the corpus; top_excerpts is a reshuffle of the records,
    split from the rows in memory right after they are written (reading 30 layers' records back took a third of
    the time after the pass) or, selected alone (a changed split count), from the records files.

    A layer whose records another variant already holds with the same extraction settings (`extraction_key`) is
    not extracted again: its files are that variant's (hard links), checked and split here, and the subject model
    runs only for the layers left (none at all when every layer is shared). Nor is a layer whose records the pass of
    another variant's run read for this one (run together: `joint_choices`, `hand_over`, `joint_extracted`)."""
    selected = {key.to_user_string() for key in context.selected_asset_keys}
    variant, layers = variant_of(context), layers_of(context)
    settings = VariantSettings(storage.path(), variant)
    run_resources = {"selection": selection, "quality": quality}  # as configured; each variant's fields go over them
    selection, quality = settings("selection", selection), settings("quality", quality)
    out = Outputs(context, storage.path(), variant)
    excerpts = _Excerpts(context, out, selection, quality) if TOP_EXCERPTS in selected else None
    if not selected & set(SUBJECT_MODEL_FILES):
        for layer, split in ahead(layers, excerpts.split):
            excerpts.report(layer, split)
        yield out.result(TOP_EXCERPTS)
        return
    counted = LOOKUP_BASELINE in quality.baselines
    with bad_input_fails_the_run():
        quality.checked()
        corpus_file = asset_path(storage.path(), CORPUS)
        documents = read(storage.path(), CORPUS)
    corpus = {"corpus": file_digest(corpus_file)}
    step = _Step(context, out, storage.path(), variant, selection, subject_model,
                 _extraction_key(subject_model, corpus, selection, counted), counted,
                 ACTIVATION_RECORDS in selected, TOKEN_TABLE in selected, excerpts)
    stored = _stored_layers(step, layers)
    extracted = [layer for layer in layers if layer not in stored]
    extraction, joint = (_run_pass(step, documents, extracted, layers, run_resources, corpus) if extracted
                         else (None, {}))
    written = Progress("activation records written", len(layers), context.log.info, unit="layers")
    pass_metadata = _pass_metadata(extraction, joint, selection.random_k)
    todo = [(layer, stored[layer][1]) for layer in layers if layer in stored]
    todo += list(extraction.layers.items()) if extraction else []
    withheld: dict[str, list[int]] = {}
    for (layer, found), files in ahead(todo, partial(_write_layer, step, extraction)):
        _report_layer(step, layer, found, files, _stored_origin(found) if isinstance(found, StoredLayer)
                      else pass_metadata)
        if excerpts:
            if files.excerpts_withheld is not None:
                withheld.setdefault(files.excerpts_withheld, []).append(layer)
            else:
                excerpts.report(layer, files.excerpts)
        written.advance()
    # the records and token table are materialized whatever became of the split: a failed records check stops their
    # layer here as a blocking check stops the steps after it, and after a bad split count only top_excerpts reruns
    yield from out.results(*step.writing)
    if withheld:
        raise dg.Failure(description="; ".join(f"top_excerpts not written for layer{'s' if len(at) > 1 else ''} "
                                               f"{', '.join(map(str, at))}: {why}" for why, at in withheld.items()))
    if excerpts:
        yield out.result(TOP_EXCERPTS)


@dataclass(frozen=True)
class _Step:
    """What the parts of one activation_records step share: where it reports and writes, for which variant, with
    which settings (`key`: the extraction key), and which of the pass's assets it writes."""

    context: dg.AssetExecutionContext
    out: Outputs
    storage_dir: Path
    variant: str
    selection: SelectionResource
    subject_model: SubjectModelResource
    key: str
    counted: bool  # the lookup baseline is on: the token table is counted
    records_written: bool
    table_written: bool
    excerpts: "_Excerpts | None"  # top_excerpts selected: split here

    @property
    def writing(self) -> list[str]:
        """The subject model's assets the step writes."""
        return [a for a, on in zip(SUBJECT_MODEL_FILES, (self.records_written, self.table_written)) if on]


@dataclass
class LayerFiles:
    """One layer's part of the step, made on a worker thread (`_write_layer`) and reported on the step's thread
    (`_report_layer`): the files written (path and file metadata; None where the asset is not selected), the checks
    made on them (`validation.Check` fields), and top_excerpts' split of the records, or why it was withheld."""

    records_file: tuple[Path, dict] | None = None
    records_checks: dict[str, tuple] = field(default_factory=dict)  # name → check, in CHECKS order
    table_file: tuple[Path, dict] | None = None
    distinct_tokens: int | None = None
    table_check: tuple | None = None
    excerpts: "LayerExcerpts | None" = None  # `_Excerpts.split` of the layer
    excerpts_withheld: str | None = None  # why top_excerpts is not written for the layer


def _stored_layers(step: _Step, layers: list[int]) -> dict[int, tuple[str, "StoredLayer"]]:
    """layer → (the variant whose pass made them, its files) for the layers whose extraction is on disk already:
    another variant's with the same settings, or what a pass run for another variant read for this one (logged: no
    forward pass runs for them)."""
    stored = shared_extractions(step.context.instance, step.key, step.variant, layers, step.writing, step.storage_dir)
    if stored:
        step.context.log.info(f"{step.variant}: layers {sorted(stored)} share the extraction of "
                              f"{', '.join(sorted(set(v for v, _ in stored.values())))} (same settings): no forward "
                              "pass for them")
    stored.update({layer: (found.origin["extracted_with_variant"], found)
                   for layer, found in joint_extracted(step.storage_dir, step.key,
                                                       [n for n in layers if n not in stored]).items()})
    read_before = sorted(layer for layer, (_, found) in stored.items() if "extracted_in_run" in found.origin)
    if read_before:
        step.context.log.info(f"{step.variant}: layers {read_before} were read in the pass of variant "
                              f"{stored[read_before[0]][0]}'s run (run together): no forward pass for them")
    return stored


def _run_pass(step: _Step, documents: pl.DataFrame, extracted: list[int], layers: list[int], run_resources: dict,
              corpus: dict) -> tuple[stages.Extraction, dict[str, tuple[stages.UnitChoice, str]]]:
    """The subject model's pass for the layers `extracted`, reading too what the variants run together with this one
    need (`joint_choices`), whose records it hands over to their runs (`hand_over`): (extraction, those variants)."""
    sel = step.selection
    main = stages.UnitChoice(tuple(extracted), sel.units, sel.neurons, sel.neurons_per_layer, sel.seed,
                             sel.dictionary, sel.dictionary_hook, sel.top_k, sel.random_k, sel.quantile_k,
                             step.counted and step.table_written, sel.subject_weights)
    joint = joint_choices(step.context, step.storage_dir, run_resources, step.subject_model, corpus, step.key, layers,
                          main)
    model = step.subject_model
    with bad_input_fails_the_run():
        extraction = stages.activation_records(
            documents, model.model, extracted, units=sel.units, neurons=sel.neurons,
            neurons_per_layer=sel.neurons_per_layer, seed=sel.seed, dictionary=sel.dictionary,
            dictionary_hook=sel.dictionary_hook, top_k=sel.top_k, random_k=sel.random_k, quantile_k=sel.quantile_k,
            token_table=step.counted and step.table_written, device=model.resolved_device(), dtype=model.dtype,
            batch_size=model.batch_size, window_tokens=model.window_tokens, subject_weights=sel.subject_weights,
            also={other: choice for other, (choice, _) in joint.items()}, log=step.context.log.info)
    hand_over(step.context, step.storage_dir, step.variant, extraction, joint)
    return extraction, joint


def _pass_metadata(extraction: stages.Extraction | None, joint: dict, random_k: int) -> dict:
    """The materialization metadata of a layer this step's pass read: the pass's figures ({}: no pass ran)."""
    if extraction is None:
        return {}
    stats = extraction.stats
    return {"tokens_processed": stats.tokens, "windows": stats.windows,
            "tokens_per_second": round(stats.tokens_per_second, 1), "wall_seconds": round(stats.seconds, 2),
            "device": extraction.device, "layers_in_this_pass": str(sorted(extraction.layers)),
            **({"pass_read_also_for_variants": ", ".join(sorted(joint))} if joint else {}),
            "random_k": min(random_k, stats.windows), "subject_model_forward_passes": stats.batches}


def _stored_origin(found: "StoredLayer") -> dict:
    """The materialization metadata of a layer whose files were on disk: where they came from; no forward pass."""
    return {**found.origin, "tokens_processed": 0, "windows": found.windows, "random_k": found.random_k,
            "subject_model_forward_passes": 0}


def _write_layer(step: _Step, extraction: stages.Extraction | None, item: tuple) -> LayerFiles:
    """On a worker thread: one layer's files and their checks, and its top_excerpts split; nothing reported. The
    layer's rows are in memory only while its files are written."""
    layer, found = item
    files = LayerFiles()
    records = found.records
    if step.records_written:
        random_k = (found.random_k if isinstance(found, StoredLayer) else
                    min(step.selection.random_k, extraction.stats.windows))
        files.records_file = _place(step.out, ACTIVATION_RECORDS, found, records, layer)
        files.records_checks = {
            "top_windows_ordered": validation.top_windows_ordered(records),
            "record_counts": validation.record_counts(records, found.units, step.selection.top_k, random_k)}
    if step.table_written:
        table = found.token_table
        files.table_file = _place(step.out, TOKEN_TABLE, found, table, layer)
        files.distinct_tokens = table["token"].n_unique()
        files.table_check = validation.token_table_complete(table, records, step.counted)
    if step.excerpts:
        files.excerpts, files.excerpts_withheld = _split_excerpts(step, layer, records, files.records_checks)
    found.release()
    return files


def _place(out: Outputs, asset: str, found: LayerRecords, frame: pl.DataFrame, layer: int) -> tuple[Path, dict]:
    """The layer's file of `asset`: a link to the one on disk (another variant's, or handed over), or a new one."""
    return (out.link_file(asset, found.path(asset), frame, layer) if isinstance(found, StoredLayer) else
            out.write_file(asset, frame, layer))


def _split_excerpts(step: _Step, layer: int, records: pl.DataFrame,
                    records_checks: dict[str, tuple]) -> tuple["LayerExcerpts | None", str | None]:
    """(top_excerpts of the layer, None) from the records just written or (records not selected) from their file;
    or (None, why not): a blocking records check failed, or the split's counts are more than the corpus fills."""
    failed = [name for name, check in records_checks.items() if _stops(Check(*check))]
    if failed:
        return None, f"activation_records check {', '.join(failed)} failed"
    try:
        return step.excerpts.split(layer, records if step.records_written else None), None
    except dg.Failure as failure:  # bad input for the split (counts the corpus cannot fill): records stand
        return None, failure.description


def _report_layer(step: _Step, layer: int, found: LayerRecords, files: LayerFiles, origin: dict) -> None:
    """On the step's thread: the layer's records and token table as materialized (metadata, checks, a warning for
    units that failed), and a hand-over folder, once taken, removed."""
    out = step.out
    is_stored = isinstance(found, StoredLayer)
    if step.records_written:
        if found.failed:
            step.context.log.warning(f"layer {layer}: {len(found.failed)} units failed, their activations not "
                                     "finite (not explained): " + "; ".join(
                                         f"unit {u}: {why}" for u, why in list(found.failed.items())[:10]))
        out.written(ACTIVATION_RECORDS, layer, files.records_file, neurons=len(found.units),
                    units=found.description, dead_units=found.dead, failed_units=len(found.failed),
                    **({"failed_unit_reasons": "; ".join(f"unit {u}: {why}" for u, why in found.failed.items())}
                       if found.failed else {}),
                    subject_model=step.subject_model.model, extraction_key=step.key, variant=step.variant, **origin)
        for check in CHECKS[ACTIVATION_RECORDS]:
            out.check(ACTIVATION_RECORDS, check, layer, files.records_checks[check])
    if step.table_written:
        out.written(TOKEN_TABLE, layer, files.table_file, counted=step.counted,
                    distinct_tokens=files.distinct_tokens, extraction_key=step.key, variant=step.variant,
                    **(found.origin if is_stored else {}))
        out.check(TOKEN_TABLE, "token_table_complete", layer, files.table_check)
    if is_stored and "extracted_in_run" in found.origin:  # taken: the hand-over folder has served its purpose
        shutil.rmtree(found.path(ACTIVATION_RECORDS).parent, ignore_errors=True)


class StoredLayer(LayerRecords):
    """A layer's extraction already on disk, read when first used: another variant's files (same extraction
    settings), or those a pass run for another variant read for this one (`hand_over`). `origin`: where they came
    from, as the materialization's metadata says it."""

    def __init__(self, paths: dict[str, Path], about: dict, origin: dict):
        self.paths, self.origin = paths, origin
        self.windows, self.random_k = int(about.get("windows") or 0), int(about.get("random_k") or 0)
        rows = pl.read_parquet(paths[ACTIVATION_RECORDS], columns=["neuron", "kind"])
        failed = {}
        if (rows["kind"] == FAILED_UNIT).any():  # (files from before the `error` column hold no failed row)
            gone = pl.read_parquet(paths[ACTIVATION_RECORDS], columns=["neuron", "kind", "error"])
            failed = dict(gone.filter(pl.col("kind") == FAILED_UNIT).select("neuron", "error").iter_rows())
        super().__init__(rows["neuron"].unique().sort().to_list(), self._read, str(about.get("units") or ""),
                         int(about.get("dead_units") or 0), failed)

    def path(self, asset: str) -> Path:
        return self.paths[asset]

    def _read(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        table = self.path(TOKEN_TABLE)
        return (pl.read_parquet(self.path(ACTIVATION_RECORDS)),
                pl.read_parquet(table) if table.exists() else empty(TOKEN_TABLE))


def _metadata_value(record, name: str):
    entry = (record.asset_materialization.metadata or {}).get(name)
    return getattr(entry, "value", entry)


def _extraction_key(subject_model: SubjectModelResource, corpus: dict, selection: SelectionResource,
                    counted: bool) -> str:
    return extraction_key(subject_model.model_dump(), corpus, selection.model_dump(), counted,
                          [METHOD_REVISIONS[a] for a in SUBJECT_MODEL_FILES])


def shared_extractions(instance: dg.DagsterInstance, key: str, variant: str, layers: list[int], assets: list[str],
                       storage_dir: Path, own: bool = False) -> dict[int, tuple[str, StoredLayer]]:
    """layer → (the other variant, its files) for each of `layers` whose latest materializations of every asset of
    `assets` in another variant (`own`: or in `variant` itself) were made with extraction settings `key`, and whose
    files are still there."""
    others = [v for v in instance.get_dynamic_partitions(VARIANT) if own or v != variant]
    found: dict[int, tuple[str, StoredLayer]] = {}
    for layer in layers:
        for other in others:
            latest = {}
            for asset in assets:
                records = instance.fetch_materializations(dg.AssetRecordsFilter(
                    asset_key=dg.AssetKey(asset), asset_partitions=[str(partition_key(layer, other))]), limit=1).records
                latest[asset] = records[0] if records else None
            if not all(r is not None and _metadata_value(r, "extraction_key") == key for r in latest.values()):
                continue
            paths = {asset: asset_path(storage_dir, asset, layer, other) for asset in SUBJECT_MODEL_FILES}
            if not all(paths[asset].exists() for asset in assets):
                continue
            about = {k: getattr(v, "value", v)
                     for k, v in (latest[assets[0]].asset_materialization.metadata or {}).items()}
            found[layer] = (other, StoredLayer(paths, about, {"shared_from_variant": other}))
            break
    return found


# ------------------------------------------------------------------- several variants' unit sets in one pass

HANDED_OVER = "about.json"  # written last in a hand-over folder: its files are complete


def joint_choices(context: dg.AssetExecutionContext, storage_dir: Path, run_resources: dict,
                  subject_model: SubjectModelResource, corpus: dict, key: str, layers: list[int],
                  main: stages.UnitChoice) -> dict[str, tuple[stages.UnitChoice, str]]:
    """The other variants this run's pass reads too (run tag EXTRACT_WITH_TAG): name → (what to read for it, its
    extraction key), for the run's layers it holds no extraction of yet. A variant left out (its settings share
    this variant's files anyway, order the pass otherwise, or cannot be read) extracts in its own run, as alone."""
    names = [n for n in (context.run.tags.get(EXTRACT_WITH_TAG) or "").split(",") if n]
    out = {}
    for other in names:
        if other == variant_of(context):
            continue
        try:
            settings = VariantSettings(storage_dir, other)
            sel, qual = settings("selection", run_resources["selection"]), settings("quality", run_resources["quality"])
            counted = LOOKUP_BASELINE in qual.checked().baselines
            other_key = _extraction_key(subject_model, corpus, sel, counted)
            if other_key == key:
                continue  # its own run shares this variant's files
            held = shared_extractions(context.instance, other_key, other, layers, list(SUBJECT_MODEL_FILES),
                                      storage_dir, own=True)
            todo = tuple(layer for layer in layers if layer not in held
                         and not (joint_extraction_dir(storage_dir, other_key, layer) / HANDED_OVER).exists())
            if not todo:
                continue
            choice = stages.UnitChoice(todo, sel.units, sel.neurons, sel.neurons_per_layer, sel.seed, sel.dictionary,
                                       sel.dictionary_hook, sel.top_k, sel.random_k, sel.quantile_k, counted,
                                       sel.subject_weights)
            if choice.units == PLANTED:
                continue  # its own run reads no model
            if choice.pass_key() != main.pass_key():
                context.log.info(f"variant {other}: another subject model (weights), or a quantile_k or seed that "
                                 "orders the corpus's windows otherwise; it extracts in its own run")
                continue
            choice.unit_sets(subject_model.model)  # settings this pass cannot read: that variant's run says why
        except (dg.Failure, NdxInputError) as e:
            why = e.description if isinstance(e, dg.Failure) else str(e)
            context.log.warning(f"variant {other} is not read in this pass ({why}); it extracts in its own run")
            continue
        out[other] = (choice, other_key)
    if out:
        context.log.info("this pass reads also " + "; ".join(f"layers {list(choice.layers)} of variant {other}"
                                                               for other, (choice, _) in out.items()))
    return out


def hand_over(context: dg.AssetExecutionContext, storage_dir: Path, variant: str, extraction: stages.Extraction,
              joint: dict[str, tuple[stages.UnitChoice, str]]) -> None:
    """Leave the records the pass read for the other variants where their runs take them (`joint_extracted`)."""
    for other, (choice, other_key) in joint.items():
        for layer, found in extraction.joint[other].items():
            folder = joint_extraction_dir(storage_dir, other_key, layer)
            write_parquet_atomic(found.records, folder / f"{ACTIVATION_RECORDS}.parquet")
            write_parquet_atomic(found.token_table, folder / f"{TOKEN_TABLE}.parquet")
            about = {"variant": variant, "run_id": context.run_id, "for_variant": other,
                     "windows": extraction.stats.windows, "random_k": min(choice.random_k, extraction.stats.windows),
                     "units": found.description, "dead_units": found.dead}
            write_text_atomic(json.dumps(about, indent=1), folder / HANDED_OVER)
            found.release()


def joint_extracted(storage_dir: Path, key: str, layers: list[int]) -> dict[int, StoredLayer]:
    """layer → the files a pass run for another variant read for this one (extraction settings `key`)."""
    found = {}
    for layer in layers:
        folder = joint_extraction_dir(storage_dir, key, layer)
        if not (folder / HANDED_OVER).exists():
            continue
        about = json.loads((folder / HANDED_OVER).read_text(encoding="utf-8"))
        found[layer] = StoredLayer({asset: folder / f"{asset}.parquet" for asset in SUBJECT_MODEL_FILES}, about,
                                   {"extracted_with_variant": about["variant"], "extracted_in_run": about["run_id"]})
    return found


def _stops(check: Check) -> bool:
    """A failed check that stops its layer's data, as a blocking asset check does: ERROR severity."""
    return not check.passed and check.severity == ERROR


class _Excerpts:
    """top_excerpts of the layers of one step: `split` (on a worker thread: the file and its checks, nothing
    reported), then `report` (on the step's thread)."""

    def __init__(self, context: dg.AssetExecutionContext, out: Outputs, selection: SelectionResource,
                 quality: QualityResource):
        self.context, self.out, self.selection, self.quality = context, out, selection, quality

    def split(self, layer: int, records: pl.DataFrame | None = None) -> "LayerExcerpts":
        """Split `records` (default: the layer's stored activation_records) and write the file."""
        if records is None:
            records = self.out.read(ACTIVATION_RECORDS, layer)
        sel = self.selection
        with bad_input_fails_the_run():
            frame = stages.top_excerpts(
                records, sel.explain_excerpts, sel.score_top_excerpts, sel.score_random_excerpts,
                self.quality.checked().calibration_top_excerpts, self.quality.calibration_random_excerpts,
                scope=self.out.variant)
        units = records.select("kind", "neuron")  # (not the wide rows: a filter copies every column it keeps)
        return LayerExcerpts(
            file=self.out.write_file(TOP_EXCERPTS, frame, layer),
            fired=units.filter(~pl.col("kind").is_in([DEAD, FAILED_UNIT]))["neuron"].n_unique(),
            dead=units.filter(pl.col("kind") == DEAD).height, neurons=frame["neuron"].n_unique(),
            checks={"splits_disjoint": validation.splits_disjoint(frame),
                    "excerpt_counts": validation.excerpt_counts(frame, sel.explain_excerpts, sel.score_top_excerpts,
                                                                sel.score_random_excerpts)})

    def report(self, layer: int, split: "LayerExcerpts") -> None:
        sparse = split.fired - split.neurons
        if sparse:
            self.context.log.info(f"layer {layer}: {sparse} of {split.fired} units that fired did so in too few "
                                  "windows to fill the explain and score splits: left out")
        self.out.written(TOP_EXCERPTS, layer, split.file, neurons=split.neurons, too_sparse_units=sparse,
                         dead_units=split.dead)
        for check in CHECKS[TOP_EXCERPTS]:
            self.out.check(TOP_EXCERPTS, check, layer, split.checks[check])


@dataclass
class LayerExcerpts:
    """One layer's top_excerpts, written on a worker thread (`_Excerpts.split`) and reported on the step's thread
    (`_Excerpts.report`): the file (path and file metadata), the units that fired, those that never did, those the
    splits keep, and the checks made on it (`validation.Check` fields, by name)."""

    file: tuple[Path, dict]
    fired: int
    dead: int
    neurons: int
    checks: dict[str, tuple]
