"""ndx-pipeline: explain the neurons of a language model with another language model, as a Dagster pipeline.

`ndx_pipeline.defs` is the `dagster.Definitions` (loaded on first access, so the pure core can be imported
without Dagster).
"""

from ndx_pipeline.core.heap import keep_polars_freed_pages

keep_polars_freed_pages()  # before anything imports polars

__version__ = "0.1.0"


def __getattr__(name):
    if name == "defs":
        from ndx_pipeline.definitions import defs

        return defs
    raise AttributeError(name)
