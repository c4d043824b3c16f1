"""The Dagster skin, loaded as a `dg` defs folder (`ndx_pipeline.definitions`): partitions, resources, assets by
stage group, checks, automation (conditions, jobs, sensor, schedule), code versions, metadata, provenance and step
placement. Everything here is thin: the work is done by `ndx_pipeline.core.stages`."""
