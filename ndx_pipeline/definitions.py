"""`defs`: the Dagster definitions of ndx-pipeline, loaded from the `ndx_pipeline/defs` folder as `dg` projects do
(`[tool.dg]` in pyproject.toml). `dagster dev` (workspace.yaml, `[tool.dagster]`), `dg dev`, `dg check defs` and the
CLI all load these."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import dagster as dg

import ndx_pipeline.defs as defs_package

# backfill_policy and partitioned checks are marked beta/preview in Dagster 1.13; we rely on them knowingly.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent  # holds pyproject.toml in a source checkout (an editable install)


def build_definitions() -> dg.Definitions:
    """The definitions as the environment sets them (NDX_* variables, see README): the layer partitions come from
    the subject model's config, the code versions from the configured models, counts and prompt templates.

    Each call re-imports the defs folder, as a code-location reload does, so a changed setting is seen."""
    for name in [m for m in sys.modules if m == defs_package.__name__ or m.startswith(defs_package.__name__ + ".")]:
        if name != defs_package.__name__:
            del sys.modules[name]
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return dg.load_from_defs_folder(path_within_project=PROJECT_ROOT)
    # installed from a wheel: no pyproject.toml beside the package; the same folder, found from the package itself
    return dg.ComponentTree.from_module(defs_module=defs_package, project_root=PACKAGE_DIR).build_defs()


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
