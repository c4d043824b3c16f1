"""The release: the dataset export of chosen variants (`reports.dataset.write_dataset`), with its card as the
materialization's metadata. On demand only: no layer partitions, no automation condition, and outside the jobs
`ndx-pipeline run`, the sensors and the schedule launch (`automation.ON_DEMAND_ASSETS`)."""

import dagster as dg
from pydantic import Field

from ndx_pipeline.core.contract import ACTIVATION_RECORDS, CORPUS, RELEASE, SCORER_ASSETS, SIMULATIONS
from ndx_pipeline.core.storage import variant_layers
from ndx_pipeline.defs.materialize import REPORTS_GROUP, bad_input_fails_the_run
from ndx_pipeline.defs.provenance import recorded_subject_model
from ndx_pipeline.defs.resources import StorageResource
from ndx_pipeline.reports.dataset import FORMAT_REVISION, TABLES, chosen_variants, write_dataset

RELEASE_DIR = "release"  # the export's default folder, under the storage folder
READS = (CORPUS, ACTIVATION_RECORDS, SIMULATIONS, *TABLES,
         *(judgements for judgements, _ in SCORER_ASSETS.values()))


class ReleaseConfig(dg.Config):
    variants: list[str] | None = Field(
        default=None, description="The variants to release, each with its stored controls (`<variant>.planted`, "
                                  "`<variant>.random-weights`). Default: every stored variant.")
    out: str | None = Field(default=None, description="The folder to write (replaced whole when it holds an earlier "
                                                      "export; refused when it holds anything else). Default: "
                                                      "<storage>/release.")


@dg.asset(name=RELEASE, group_name=REPORTS_GROUP, deps=list(dict.fromkeys(READS)),
          code_version=f"dataset-format-{FORMAT_REVISION}",
          description="On demand: the dataset export of the chosen variants (default every stored one, with their "
                      "controls) — one Parquet file per asset kind across layers and variants, and a dataset card "
                      "(README.md) that polars, the `datasets` library and the Hugging Face hub read — written to "
                      "<storage>/release unless configured. Not part of `ndx-pipeline run`.")
def release(context: dg.AssetExecutionContext, config: ReleaseConfig, storage: StorageResource) -> dg.MaterializeResult:
    root = storage.path()
    out = config.out or str(root / RELEASE_DIR)
    with bad_input_fails_the_run():
        chosen = chosen_variants(root, config.variants)
        subject = recorded_subject_model(context.instance, {v: variant_layers(root, ACTIVATION_RECORDS, v)
                                                            for v in chosen})
        done = write_dataset(root, out, variants=config.variants, about={"subject_model": subject} if subject else None,
                             log=context.log.info)
    context.log.info(f"dataset export of {', '.join(done.variants)} written to {done.out}")
    return dg.MaterializeResult(metadata={
        "card": dg.MetadataValue.md(done.card),
        "path": dg.MetadataValue.path(str(done.out)),
        "variants": ", ".join(done.variants),
        "layers": {v: ",".join(map(str, at)) for v, at in done.layers.items()},
        "files": len(done.files),
        **{f"rows_{asset}": n for asset, n in done.rows.items()},
    })
