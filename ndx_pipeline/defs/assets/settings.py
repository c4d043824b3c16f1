"""The variants' settings as observed assets: `variant_settings/<group>`, partitioned by variant, one per group of
stages (`versioning.SETTINGS_GROUPS`). Nothing materializes them: the CLI and the sensors observe a new version
when a variant's settings change (`versioning.observe_settings`), and the variant's partitions of that group's
stages turn stale, no other."""

import dagster as dg

from ndx_pipeline.defs.materialize import SETTINGS_GROUP
from ndx_pipeline.defs.partitions import variants
from ndx_pipeline.defs.versioning import SETTINGS_GROUPS, settings_key


@dg.definitions
def variant_settings() -> dg.Definitions:
    return dg.Definitions(assets=[
        dg.AssetSpec(settings_key(group), partitions_def=variants, group_name=SETTINGS_GROUP,
                     description=f"Each variant's settings for the {group} stages ({', '.join(assets)}), observed "
                                 "from the variants file: a new version makes that variant's partitions of them "
                                 "stale.")
        for group, assets in SETTINGS_GROUPS.items()])
