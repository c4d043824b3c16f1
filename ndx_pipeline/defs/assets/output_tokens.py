"""The output side of each unit (`output_tokens`): the tokens its output direction promotes and suppresses, read off
the subject model's weights (no pass over the corpus), for the viewer's "promotes / suppresses" lists, lineage, the
Neuronpedia export's `pos_str` / `neg_str`, and the explainer when `quality.explainer_logits` is on."""

import dagster as dg

from ndx_pipeline.core import stages
from ndx_pipeline.core.contract import ACTIVATION_RECORDS, OUTPUT_TOKENS
from ndx_pipeline.core.stages import UNIT_FIELDS
from ndx_pipeline.core.storage import read_asset
from ndx_pipeline.defs.automation import FOLLOW_UPSTREAM
from ndx_pipeline.defs.materialize import (
    EXTRACTION_GROUP,
    SINGLE_RUN,
    SUBJECT_MODEL_POOL,
    Outputs,
    VariantSettings,
    bad_input_fails_the_run,
    layers_of,
    one_writer,
    variant_of,
)
from ndx_pipeline.defs.partitions import layer_variant
from ndx_pipeline.defs.queues import step_tags
from ndx_pipeline.defs.resources import SelectionResource, StorageResource, SubjectModelResource
from ndx_pipeline.defs.versioning import CODE_VERSIONS, with_settings


@dg.asset(name=OUTPUT_TOKENS, op_tags=step_tags(OUTPUT_TOKENS), group_name=EXTRACTION_GROUP,
          pool=SUBJECT_MODEL_POOL, deps=with_settings(OUTPUT_TOKENS, [ACTIVATION_RECORDS]),
          partitions_def=layer_variant,
          backfill_policy=SINGLE_RUN, code_version=CODE_VERSIONS[OUTPUT_TOKENS],
          automation_condition=FOLLOW_UPSTREAM,
          description="Per unit: the tokens whose logits its output direction (an MLP neuron's column of the output "
                      "projection, a latent's decoder row) raises and lowers most, through the final norm's gain "
                      "and the unembedding; no rows for planted units, which have no weights.")
@one_writer
def output_tokens(context: dg.AssetExecutionContext, subject_model: SubjectModelResource,
                  selection: SelectionResource, storage: StorageResource):
    variant, layers = variant_of(context), layers_of(context)
    with bad_input_fails_the_run():
        chosen = VariantSettings(storage.path(), variant)("selection", selection)
    out = Outputs(context, storage.path(), variant)
    # the unit columns alone: a layer's records of every neuron are hundreds of MB of windows this step never reads
    with bad_input_fails_the_run():
        records = {layer: read_asset(storage.path(), ACTIVATION_RECORDS, layer, variant, columns=list(UNIT_FIELDS))
                   for layer in layers}
    with bad_input_fails_the_run():
        frames = stages.output_tokens(records, subject_model.model, dictionary=chosen.dictionary,
                                      dictionary_hook=chosen.dictionary_hook, subject_weights=chosen.subject_weights,
                                      seed=chosen.seed, log=context.log.info)
    for layer, frame in frames.items():
        out.write(OUTPUT_TOKENS, frame, layer, units=len(frame),
                  direction=frame["direction"][0] if len(frame) else "none (planted units have no weights)")
    return out.result(OUTPUT_TOKENS)
