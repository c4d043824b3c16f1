"""Resuming an interrupted `ndx-pipeline run`: the same command again takes up where the killed (or stopped) one
left off, exactly.

Every run a command launches carries two tags: `ndx/command`, a digest of everything the command computes (its
layers, variants, controls and `--from`, each variant's resolved settings, the resources as configured, the assets'
code versions, the corpus files' sizes and times), and `ndx/invocation`, which invocation of the command launched
it. When the newest run with the same digest was interrupted (`pools.INTERRUPTED_TAG`: killed, and marked failed by
`pools.release_stale_runs`, or stopped by SIGTERM / Ctrl-C), the new invocation continues that one (and takes its
invocation id): for each run it would launch (a variant and a range of layers), the steps that finished in the
interrupted invocation's runs are left out, so their files are not written again; the interrupted step runs again
and every LLM answer it had received comes from the LLM cache. Nothing is resumed when any run of that invocation
failed for another reason (a failed check, bad input): then the command runs afresh.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import dagster as dg

from ndx_pipeline.core.variants import settings_digest
from ndx_pipeline.defs.partitions import layer_and_variant
from ndx_pipeline.defs.pools import INTERRUPTED_TAG

COMMAND_TAG = "ndx/command"
INVOCATION_TAG = "ndx/invocation"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def command_digest(**parts) -> str:
    """The digest of what a command computes (its parts as JSON)."""
    return settings_digest(parts)


def _range(tags) -> tuple[str, int, int] | None:
    if RANGE_START not in tags or RANGE_END not in tags:
        return None
    (lo, variant), (hi, _) = layer_and_variant(tags[RANGE_START]), layer_and_variant(tags[RANGE_END])
    return variant, lo, hi


def finished_assets(instance: dg.DagsterInstance, run_id: str) -> set[dg.AssetKey]:
    """The assets a run materialized in the steps that succeeded (whole steps: a step cut short is run again)."""
    done = {e.step_key for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)}
    return {e.dagster_event.asset_key
            for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
            if e.step_key in done}


@dataclass
class Resume:
    """What an interrupted invocation of the same command finished, per run it launched (variant, first layer, last
    layer)."""

    invocation: str
    interrupted: str  # the run id of the run that was interrupted
    why: str
    finished: dict[tuple[str, int, int], set[dg.AssetKey]] = field(default_factory=dict)
    runs: dict[tuple[str, int, int], list[str]] = field(default_factory=dict)

    def left(self, variant: str, lo: int, hi: int, subset) -> tuple[set, str | None]:
        """The assets of `subset` still to materialize for layers lo…hi of `variant`, and a line saying what is kept
        (None when nothing is)."""
        kept = self.finished.get((variant, lo, hi), set()) & set(subset)
        if not kept:
            return set(subset), None
        rest = set(subset) - kept
        by = ", ".join(run[:8] for run in self.runs[(variant, lo, hi)])
        if not rest:
            return rest, f"layers {lo}–{hi} of {variant}: finished before the interruption (run {by}); kept as they are"
        names = ", ".join(sorted(k.to_user_string() for k in kept))
        return rest, (f"layers {lo}–{hi} of {variant}: resumed; {names} finished before the interruption (run {by}) "
                      "and are kept as they are")


def resumable(instance: dg.DagsterInstance, digest: str) -> Resume | None:
    """The interrupted invocation of the command with this digest to continue, or None (its newest run was not
    interrupted, or a run of its invocation failed for another reason)."""
    newest = instance.get_run_records(dg.RunsFilter(tags={COMMAND_TAG: digest}), limit=1)
    if not newest or INTERRUPTED_TAG not in newest[0].dagster_run.tags:
        return None
    last = newest[0].dagster_run
    invocation = last.tags.get(INVOCATION_TAG)
    if not invocation:
        return None
    resume = Resume(invocation, last.run_id, last.tags[INTERRUPTED_TAG])
    for record in instance.get_run_records(dg.RunsFilter(tags={INVOCATION_TAG: invocation})):
        run = record.dagster_run
        if run.tags.get(COMMAND_TAG) != digest:
            return None
        if run.status != dg.DagsterRunStatus.SUCCESS and INTERRUPTED_TAG not in run.tags:
            return None  # failed otherwise (a check, bad input): what it left is not an interruption's
        at = _range(run.tags)
        if at is None:
            continue
        done = finished_assets(instance, run.run_id)
        if done:
            resume.finished.setdefault(at, set()).update(done)
            resume.runs.setdefault(at, []).append(run.run_id)
    return resume


def invocation_tags(digest: str, resume: Resume | None) -> dict[str, str]:
    """The tags every run of this invocation carries."""
    return {COMMAND_TAG: digest, INVOCATION_TAG: resume.invocation if resume else uuid.uuid4().hex}
