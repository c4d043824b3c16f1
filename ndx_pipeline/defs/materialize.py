"""What every asset body shares: the layers and the variant of its run (and the variant's settings), turning a bad
input into one clear run failure, reading upstream files, and writing its outputs — atomically, with per-layer
metadata, check results, and a data version that hashes the bytes written (an unchanged output keeps its children
fresh); `ahead` builds and writes the next layers' files on worker threads while one layer is reported.
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import dagster as dg
import polars as pl

from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.partition_lock import partition_lock
from ndx_pipeline.core.storage import asset_path, link_atomic, read_asset, write_parquet_atomic
from ndx_pipeline.core.validation import ERROR, Check
from ndx_pipeline.core.variants import declared_settings, settings_digest, variants_file
from ndx_pipeline.defs.checks import CHECKS
from ndx_pipeline.defs.metadata import content_hash, file_digest, file_metadata
from ndx_pipeline.defs.partitions import layer_and_variant, partition_key

T, R = TypeVar("T"), TypeVar("R")
# The UI's asset groups, as a reader follows the method: the paper's chain (extraction → explanation → simulation and
# scoring), the scorers beside simulation, the reports, and the variants' observed settings folded apart.
EXTRACTION_GROUP, EXPLANATION_GROUP, SIMULATION_GROUP = "extraction", "explanation", "simulation_and_scoring"
SCORERS_GROUP, REPORTS_GROUP, SETTINGS_GROUP = "scorers", "reports", "variant_settings"
LLM_POOL = "llm"
SUBJECT_MODEL_POOL = "subject_model"
SINGLE_RUN = dg.BackfillPolicy.single_run()  # one run carries every requested layer: the model loads once


def layers_of(context: dg.AssetExecutionContext) -> list[int]:
    """The layers of the run's variant (`variant_of`)."""
    variant_of(context)
    return sorted(layer_and_variant(k)[0] for k in context.partition_keys)


def variant_of(context: dg.AssetExecutionContext) -> str:
    """The one variant of the run's partitions: a run carries one variant (its settings are the run's)."""
    found = sorted({layer_and_variant(k)[1] for k in context.partition_keys})
    if len(found) != 1:
        raise dg.Failure(description=f"one run carries the layers of one variant, and this one holds {found}: "
                                     "launch one run per variant.")
    return found[0]


class VariantSettings:
    """The settings of one variant: its fields in the variants file (or those its default name implies) applied over
    the resources as the run configured them."""

    def __init__(self, storage_dir: Path, variant: str):
        self.variant, self.path = variant, variants_file(storage_dir)
        with bad_input_fails_the_run():
            self.fields = declared_settings(storage_dir, variant)

    def __call__(self, name: str, resource):
        """`resource` (the run's resource `name`) with the variant's fields for it."""
        fields = self.fields.get(name) or {}
        if not fields:
            return resource
        unknown = sorted(set(fields) - set(type(resource).model_fields))
        if unknown:
            raise dg.Failure(description=f"variants file {self.path}: variant {self.variant!r} sets {name} fields "
                                         f"{unknown}, which {name} does not have.")
        try:
            return type(resource)(**{**resource.model_dump(), **fields})
        except Exception as e:  # a value of the wrong type: one sentence naming the file and the variant
            raise dg.Failure(description=f"variants file {self.path}: variant {self.variant!r} sets {name} to "
                                         f"values it cannot take ({str(e).splitlines()[0]}).") from None

    def digest(self, **resources) -> str:
        """A hash of the settings a stage ran with (recorded per partition: the variant's settings version)."""
        return settings_digest({k: r.model_dump() for k, r in sorted(resources.items())})


@contextmanager
def bad_input_fails_the_run() -> Iterator[None]:
    """An NdxInputError (bad input, named in one sentence) becomes the run's failure message, without a trace."""
    try:
        yield
    except NdxInputError as e:
        raise dg.Failure(description=str(e)) from None


def one_writer(body: Callable) -> Callable:
    """An asset body that holds its step's write lock on its run's layers (`core.partition_lock`) from before it
    reads its inputs until its files are written and reported: a second run of the same step on the same layer of the
    variant (two CLIs, the CLI and a sensor's run) waits, saying who it waits for, instead of interleaving writes.
    The body's signature is the one Dagster reads (its resources); returned or yielded results pass through."""

    @functools.wraps(body)
    def locked(context: dg.AssetExecutionContext, *args, **kwargs):
        storage_dir = context.resources.storage.path()
        step = context.op_def.name
        with partition_lock(storage_dir, variant_of(context), step, layers_of(context), context.run_id,
                            context.log.info):
            made = body(context, *args, **kwargs)
            if inspect.isgenerator(made):
                yield from made
            else:
                yield made

    return locked


def read(storage_dir: Path, asset: str, layer: int | None = None, variant: str | None = None) -> pl.DataFrame:
    """An upstream asset's file, or a run failure saying which one is missing."""
    with bad_input_fails_the_run():
        return read_asset(storage_dir, asset, layer, variant)


LAYERS_AHEAD = 2  # layers whose files are being built and written while the run reports an earlier one


def ahead(items: Iterable[T], prepare: Callable[[T], R], depth: int = LAYERS_AHEAD) -> Iterator[tuple[T, R]]:
    """(item, prepare(item)) in the items' order, each prepared on a worker thread while up to `depth` items are in
    flight, so an asset body reports (metadata, checks, progress: Dagster calls, on this thread) one layer while the
    next ones are built and written. Building frames and writing Parquet run in numpy, polars and Arrow outside the
    GIL, and one layer's single-threaded steps leave the second core idle: measured, 4 layers of a whole-model
    extraction's records and excerpts took 5.6 s one after the other, 4.3-4.6 s two at a time. An error in
    `prepare` is raised here, at its item: the items after it are not yielded, and of them only those already in
    flight (fewer than `depth`) were started."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=depth) as pool:
        flight: deque = deque()
        try:
            for item in items:
                flight.append((item, pool.submit(prepare, item)))
                if len(flight) >= depth:
                    done, future = flight.popleft()
                    yield done, future.result()
            while flight:
                done, future = flight.popleft()
                yield done, future.result()
        finally:
            for _, future in flight:
                future.cancel()


class Outputs:
    """The files one materialization writes, per asset and layer of its run's variant, with their metadata and check
    results."""

    def __init__(self, context: dg.AssetExecutionContext, storage_dir: Path, variant: str | None = None):
        self.context, self.storage_dir, self.variant = context, storage_dir, variant
        self.paths: dict[str, list[Path]] = defaultdict(list)
        self.digests: dict[Path, str] = {}  # of the files written, for the data versions
        self.checks: dict[str, dict[str, dict[int, Check]]] = defaultdict(lambda: defaultdict(dict))

    def write(self, asset: str, frame: pl.DataFrame, layer: int | None = None, **metadata) -> Path:
        """Write one file of `asset` (atomically) and report its metadata on the asset's partition `layer`."""
        return self.written(asset, layer, self.write_file(asset, frame, layer), **metadata)

    def write_file(self, asset: str, frame: pl.DataFrame, layer: int | None = None) -> tuple[Path, dict]:
        """Write one file of `asset` (atomically) without reporting it, so a worker thread may call it (`ahead`):
        (its path, its file metadata) for `written`."""
        path = write_parquet_atomic(frame, asset_path(self.storage_dir, asset, layer, self.variant))
        self.digests[path] = file_digest(path)  # here, on the writing thread, while the bytes are in the page cache
        return path, file_metadata(frame, path)

    def link_file(self, asset: str, source: Path, frame: pl.DataFrame, layer: int) -> tuple[Path, dict]:
        """Put another variant's file of `asset` (holding `frame`) at this variant's path, a hard link (one copy of
        the bytes), without reporting it, as `write_file` does."""
        path = link_atomic(source, asset_path(self.storage_dir, asset, layer, self.variant))
        self.digests[path] = file_digest(path)
        return path, file_metadata(frame, path)

    def written(self, asset: str, layer: int | None, file: tuple[Path, dict], **metadata) -> Path:
        """Report a file `write_file` wrote (path and file metadata) on the asset's partition `layer`."""
        path, about = file
        self.paths[asset].append(path)
        self.report(asset, layer, {**about, **metadata})
        return path

    def read(self, asset: str, layer: int) -> pl.DataFrame:
        """An upstream file of this run's variant."""
        return read(self.storage_dir, asset, layer, self.variant)

    def report(self, asset: str, layer: int | None, metadata: dict) -> None:
        partition = None if layer is None else str(partition_key(layer, self.variant))
        self.context.add_asset_metadata(metadata, asset_key=asset, partition_key=partition)

    def check(self, asset: str, name: str, layer: int, result: tuple) -> None:
        self.checks[asset][name][layer] = Check(*result)

    def result(self, asset: str, **extra) -> dg.MaterializeResult:
        """The asset's materialization: data version = hash of its files; each declared check over every layer
        of the run (passed when every layer passed), with per-layer details."""
        results = []
        for name, per_layer in self.checks[asset].items():
            failed = [c for c in per_layer.values() if not c.passed]
            severity = (dg.AssetCheckSeverity.ERROR if any(c.severity == ERROR for c in failed)
                        else dg.AssetCheckSeverity.WARN)
            results.append(dg.AssetCheckResult(
                check_name=name, asset_key=asset, passed=not failed, severity=severity,
                description="; ".join(f"layer {layer}: {c.description}" for layer, c in sorted(per_layer.items())),
                metadata={"variant": self.variant or "",  # the layers it stops (ERROR), and those it warns about
                          "failed_layers": ",".join(str(layer) for layer, c in sorted(per_layer.items())
                                                    if not c.passed and c.severity == ERROR),
                          "warned_layers": ",".join(str(layer) for layer, c in sorted(per_layer.items())
                                                    if not c.passed and c.severity != ERROR),
                          **{f"layer_{layer}_stopped_by": c.description for layer, c in per_layer.items()
                             if not c.passed and c.severity == ERROR},
                          **{f"layer_{layer}_{k}": v for layer, c in per_layer.items() for k, v in c.details.items()}},
            ))
        missing = set(CHECKS.get(asset, {})) - set(self.checks[asset])
        if missing:
            raise RuntimeError(f"{asset}: declared checks {sorted(missing)} were not evaluated")
        version = dg.DataVersion(content_hash(self.paths[asset], self.digests))
        return dg.MaterializeResult(asset_key=asset, data_version=version, check_results=results, **extra)

    def results(self, *assets: str) -> Iterator[dg.MaterializeResult]:
        for asset in assets:
            yield self.result(asset)
