"""The neuron viewer: static HTML pages (an index, one page per neuron) written from the contract's files and the
runs that made them; opened straight from disk."""

import dagster as dg

from ndx_pipeline.core import contract as c
from ndx_pipeline.core.storage import viewer_dir
from ndx_pipeline.defs.automation import FOLLOW_UPSTREAM
from ndx_pipeline.defs.materialize import GROUP, SINGLE_RUN, Outputs, bad_input_fails_the_run, layers_of
from ndx_pipeline.defs.partitions import layers
from ndx_pipeline.defs.provenance import stage_runs
from ndx_pipeline.defs.queues import step_tags
from ndx_pipeline.defs.resources import StorageResource
from ndx_pipeline.defs.versioning import CODE_VERSIONS
from ndx_pipeline.reports.viewer import write_index, write_layer_pages

READS = (c.CORPUS, c.ACTIVATION_RECORDS, c.TOP_EXCERPTS, c.EXPLANATIONS, c.SIMULATIONS, c.SCORES, c.SCORER_EXCERPTS,
         *(a for pair in c.SCORER_ASSETS.values() for a in pair))


@dg.asset(name=c.NEURON_VIEWER, op_tags=step_tags(c.NEURON_VIEWER), group_name=GROUP, deps=list(READS),
          partitions_def=layers, backfill_policy=SINGLE_RUN, code_version=CODE_VERSIONS[c.NEURON_VIEWER],
          automation_condition=FOLLOW_UPSTREAM,
          description="Static HTML pages (open from disk): an index of neurons and one page per neuron.")
def neuron_viewer(context: dg.AssetExecutionContext, storage: StorageResource):
    folder = viewer_dir(storage.path())
    out = Outputs(context, storage.path())
    for layer in layers_of(context):
        with bad_input_fails_the_run():
            pages = write_layer_pages(storage.path(), layer, folder, runs=stage_runs(context.instance, layer))
            index = write_index(storage.path(), folder)
        out.paths[c.NEURON_VIEWER] += pages
        out.report(c.NEURON_VIEWER, layer, {"pages": len(pages), "index": dg.MetadataValue.path(str(index)),
                                            "layer_folder": dg.MetadataValue.path(str(folder / str(layer)))})
    return out.result(c.NEURON_VIEWER)
