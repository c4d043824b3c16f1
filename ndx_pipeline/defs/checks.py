"""The asset checks, declared once: per asset, each check's name and what it guarantees. All are blocking: a check
that fails with ERROR severity stops the layer's downstream steps (a WARN result does not). The checks themselves
are plain functions in `core.validation`; each asset evaluates its own (through `materialize.Outputs.check`) on
every layer it writes."""

from __future__ import annotations

import dagster as dg

from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    BASELINE_EXPLANATIONS,
    BASELINE_SIMULATIONS,
    CALIBRATION_SIMULATIONS,
    EXPLANATIONS,
    SCORER_ASSETS,
    SCORER_EXCERPTS,
    SCORES,
    SIMULATIONS,
    TOKEN_TABLE,
    TOP_EXCERPTS,
)
from ndx_pipeline.core.validation import FAILURE_SHARE_WARN

FAILURES = "failure_share"
FAILURES_BLOCK = (f"warns when more than {FAILURE_SHARE_WARN:.0%} of the layer's items failed; an error (the "
                  "layer goes no further) when every one did")
FAILURES_WARN = f"warns when more than {FAILURE_SHARE_WARN:.0%} of the layer's items failed, or all of them"

JUDGE = "judge_separates"
JUDGE_WARNS = ("warns when the judge's control says it cannot tell right from wrong: over the planted units (this "
               "partition's, or the variant's control `<variant>.planted`), the AUC interval of true against wrong "
               "explanations includes chance")

CHECKS: dict[str, dict[str, str]] = {
    ACTIVATION_RECORDS: {"top_windows_ordered": "top windows ranked by max activation",
                           "record_counts": "top_k top and random_k random rows per neuron"},
    TOKEN_TABLE: {"token_table_complete": "each neuron's token counts cover every corpus token (or no rows when "
                                            "the lookup baseline is off)"},
    TOP_EXCERPTS: {"splits_disjoint": "no explained window is scored",
                     "excerpt_counts": "the configured excerpts per split and neuron"},
    EXPLANATIONS: {"every_neuron_explained": "one kept row per neuron: ok, or failed with why",
                     FAILURES: FAILURES_BLOCK},
    BASELINE_EXPLANATIONS: {"baselines_explained": "one row per neuron for each configured baseline, none for "
                                                     "others",
                              FAILURES: FAILURES_WARN},
    CALIBRATION_SIMULATIONS: {"calibration_simulations_well_formed": "one value in [0, 10] per token"},
    SIMULATIONS: {"simulations_well_formed": "one value in [0, 10] per token", FAILURES: FAILURES_BLOCK},
    BASELINE_SIMULATIONS: {"baseline_simulations_well_formed": "one value in [0, 10] per token",
                             FAILURES: FAILURES_WARN},
    SCORES: {"scores_valid": "in [-1, 1], or NaN with a status saying why", FAILURES: FAILURES_BLOCK,
               JUDGE: JUDGE_WARNS},
    SCORER_EXCERPTS: {"held_out_from_the_explainer": "no window the explainer or best-of-k saw; the configured "
                                                       "activating and non-activating excerpts per neuron (none when "
                                                       "no scorer runs)"},
    **{judgements: {"judgements_well_formed": "each row an excerpt of scorer_excerpts with a verdict or a "
                                              "similarity, or failed with why (no rows when the scorer is off)",
                    FAILURES: FAILURES_WARN}
       for judgements, _ in SCORER_ASSETS.values()},
    **{scores: {"scorer_scores_valid": "one row per explained neuron, each score in [0, 1] or NaN with a status "
                                       "saying why (no rows when the scorer is off)", JUDGE: JUDGE_WARNS}
       for _, scores in SCORER_ASSETS.values()},
}


def check_specs(*assets: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description)
            for asset in assets for name, description in CHECKS.get(asset, {}).items()]
