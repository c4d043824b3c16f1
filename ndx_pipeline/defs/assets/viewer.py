"""The neuron viewer: static HTML pages (per variant an index and one page per unit; over the variants an index
and a comparison page) written from the contract's files and the runs that made them; opened straight from disk."""

import dagster as dg

from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    CORPUS,
    EXPLANATIONS,
    NEURON_VIEWER,
    OUTPUT_TOKENS,
    SCORER_ASSETS,
    SCORER_EXCERPTS,
    SCORES,
    SIMULATIONS,
    TOP_EXCERPTS,
)
from ndx_pipeline.core.storage import viewer_dir
from ndx_pipeline.defs.automation import FOLLOW_UPSTREAM
from ndx_pipeline.defs.materialize import (
    REPORTS_GROUP,
    SINGLE_RUN,
    Outputs,
    bad_input_fails_the_run,
    layers_of,
    one_writer,
    variant_of,
)
from ndx_pipeline.defs.partitions import layer_variant
from ndx_pipeline.defs.provenance import stage_runs
from ndx_pipeline.defs.queues import step_tags
from ndx_pipeline.defs.resources import StorageResource
from ndx_pipeline.defs.versioning import CODE_VERSIONS
from ndx_pipeline.reports.viewer import write_index, write_layer_pages, write_variants_index

READS = (CORPUS, ACTIVATION_RECORDS, OUTPUT_TOKENS, TOP_EXCERPTS, EXPLANATIONS, SIMULATIONS, SCORES,
         SCORER_EXCERPTS, *(a for pair in SCORER_ASSETS.values() for a in pair))


@dg.asset(name=NEURON_VIEWER, op_tags=step_tags(NEURON_VIEWER), group_name=REPORTS_GROUP, deps=list(READS),
          partitions_def=layer_variant, backfill_policy=SINGLE_RUN, code_version=CODE_VERSIONS[NEURON_VIEWER],
          automation_condition=FOLLOW_UPSTREAM,
          description="Static HTML pages (open from disk): per variant an index of units and one page per unit; "
                      "over the variants an index and a comparison page.")
@one_writer
def neuron_viewer(context: dg.AssetExecutionContext, storage: StorageResource):
    variant = variant_of(context)
    folder = viewer_dir(storage.path(), variant)
    out = Outputs(context, storage.path(), variant)
    for layer in layers_of(context):
        with bad_input_fails_the_run():
            pages = write_layer_pages(storage.path(), layer, folder, runs=stage_runs(context.instance, layer, variant),
                                      variant=variant)
            index = write_index(storage.path(), folder, variant=variant)
        out.paths[NEURON_VIEWER] += pages
        out.report(NEURON_VIEWER, layer, {"pages": len(pages), "index": dg.MetadataValue.path(str(index)),
                                            "layer_folder": dg.MetadataValue.path(str(folder / str(layer))),
                                            "variant": variant})
    with bad_input_fails_the_run():
        variants = write_variants_index(storage.path())
    return out.result(NEURON_VIEWER, metadata={
        "variants_index": dg.MetadataValue.path(str(variants)),
        "compare": dg.MetadataValue.path(str(variants.parent / "compare.html"))})
