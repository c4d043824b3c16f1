"""`ndx-pipeline`: run the pipeline through Dagster from a terminal, on the same instance the UI shows."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

DEFAULT_LAYERS = "0,1,2"


def ensure_dagster_home() -> Path:
    """$DAGSTER_HOME, or `./.dagster_home` when unset; given the project's dagster.yaml when it has none."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    if not (home / "dagster.yaml").exists():
        shutil.copy(Path(__file__).parent / "templates" / "dagster.yaml", home / "dagster.yaml")
    return home


def parse_layers(text: str) -> list[int]:
    from ndx_pipeline.core.errors import NdxInputError

    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise NdxInputError(f"--layers {text!r}: {part!r} is not a layer number or a range like 0-3.") from None
    if not out:
        raise NdxInputError(f"--layers {text!r} names no layer.")
    return sorted(set(out))


def contiguous_ranges(layers: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for layer in layers:
        if ranges and layer == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], layer)
        else:
            ranges.append((layer, layer))
    return ranges


def run_config(args) -> dict:
    resources: dict = {}

    def put(resource, key, value):
        if value is not None:
            resources.setdefault(resource, {"config": {}})["config"][key] = value

    put("storage", "storage_dir", args.storage)
    put("corpus_source", "path", args.corpus)
    put("subject_model", "model", args.model)
    put("subject_model", "device", args.device)
    put("subject_model", "batch_size", args.batch_size)
    put("selection", "neurons_per_layer", args.neurons_per_layer)
    put("selection", "neurons", args.neurons)
    put("selection", "seed", args.seed)
    put("quality", "explanation_candidates", args.candidates)
    if args.baselines is not None:
        put("quality", "baselines", [b.strip() for b in args.baselines.split(",") if b.strip() not in ("", "none")])
    put("explainer_llm", "model", args.explainer_model)
    put("simulator_llm", "model", args.simulator_model)
    return {"resources": resources, "loggers": {"console": {"config": {"log_level": "INFO"}}}}


def _failure_message(result) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data:
            err = event.step_failure_data.user_failure_data
            if err is not None and err.description:
                return f"{event.step_key}: {err.description}"
            if event.step_failure_data.error:
                return f"{event.step_key}: {event.step_failure_data.error.message.strip()}"
    return "the run failed (see the Dagster logs above)."


def step_seconds(instance, run_id: str) -> dict[str, float]:
    """Wall seconds of each step (asset) of a run, from its event log."""
    from dagster import DagsterEventType

    starts, out = {}, {}
    for entry in instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}):
        if entry.dagster_event.event_type == DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif entry.step_key in starts:
            out[entry.step_key] = entry.timestamp - starts[entry.step_key]
    return out


def stage_table(seconds: dict[str, float]) -> str:
    total = sum(seconds.values()) or 1.0
    return "\n".join(f"  {k:<20} {v:7.1f} s  {100 * v / total:5.1f} %" for k, v in seconds.items())


def summarize(storage: Path, layers: list[int]) -> str:
    import polars as pl

    from ndx_pipeline.core.storage import PARTITIONED_ASSETS, asset_path

    frames = {layer: pl.read_parquet(asset_path(storage, "scores", layer)) for layer in layers}
    baselines = [c for c in ("baseline_lookup", "baseline_random", "baseline_token_list")
                 if any(c in f.columns for f in frames.values())]

    def mean_of(series) -> str:
        valid = series.drop_nans().drop_nulls()
        return f"{valid.mean():7.3f}" if len(valid) else "    nan"

    head = f"{'layer':>5}  {'neurons':>7}  {'scored':>6}  {'failed':>6}  {'mean':>7}  {'median':>7}"
    lines = [head + "".join(f"  {c.removeprefix('baseline_'):>10}" for c in baselines)]
    for layer, frame in frames.items():
        valid = frame["score"].drop_nans().drop_nulls()
        median = f"{valid.median():7.3f}" if len(valid) else "    nan"
        failed = int(frame["status"].str.starts_with("failed").sum())
        row = f"{layer:>5}  {len(frame):>7}  {len(valid):>6}  {failed:>6}  {mean_of(frame['score'])}  {median}"
        row += "".join(f"  {mean_of(frame[c]) if c in frame.columns else '    nan':>10}" for c in baselines)
        lines.append(row)
    if baselines:
        lines.append("(mean score of our explanations, and of each baseline on the same excerpts: lookup = each token's "
                     "mean activation, random = another neuron's explanation, token_list = from the strongest tokens "
                     "alone)")
    lines.append("")
    lines.append(f"Parquet files: {asset_path(storage, 'corpus')}")
    for asset in PARTITIONED_ASSETS:
        lines.append(f"               {storage / asset}/<layer>.parquet")
    lines.append(f"Neuron viewer: {storage / 'neuron_viewer' / 'index.html'} (open it in a browser, no server needed)")
    return "\n".join(lines)


def bundled_llms(args) -> bool:
    """Whether the explainer or simulator of this run is the bundled SmolLM2 (in-process, no model given)."""
    from ndx_pipeline.defs.resources import default_resources

    resources = default_resources()
    return any(getattr(args, f"{stage}_model") is None and resources[f"{stage}_llm"].backend == "local"
               and "SmolLM2" in resources[f"{stage}_llm"].model for stage in ("explainer", "simulator"))


def quiet_libraries() -> None:
    """Keep the terminal for our progress: no beta warnings from Dagster, no weight-loading bars."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is currently in beta.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def cmd_run(args) -> int:
    from ndx_pipeline.core.errors import NdxInputError

    quiet_libraries()
    home_was_set = bool(os.environ.get("DAGSTER_HOME"))
    home = ensure_dagster_home()
    if args.model:
        os.environ["NDX_SUBJECT_MODEL"] = args.model
    try:
        from ndx_pipeline.core.data.subject_model import check_layers

        layers = check_layers(args.model, parse_layers(args.layers))
    except NdxInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import dagster as dg

    from ndx_pipeline.definitions import MAIN_JOB, build_definitions
    from ndx_pipeline.defs.resources import StorageResource

    defs = build_definitions()
    job = defs.resolve_job_def(MAIN_JOB)
    config = run_config(args)
    storage = StorageResource(storage_dir=args.storage).path()
    print(f"ndx-pipeline: layers {layers} on instance {home}; Parquet under {storage}", flush=True)
    started = time.perf_counter()
    stages: dict[str, float] = {}
    with dg.DagsterInstance.get() as instance:
        for lo, hi in contiguous_ranges(layers):
            tags = {"dagster/asset_partition_range_start": str(lo), "dagster/asset_partition_range_end": str(hi)}
            result = job.execute_in_process(run_config=config, instance=instance, tags=tags, raise_on_error=False)
            if not result.success:
                print(f"error: {_failure_message(result)}", file=sys.stderr)
                return 1
            print(f"run {result.run_id} succeeded (layers {lo}–{hi})", flush=True)
            for step, sec in step_seconds(instance, result.run_id).items():
                stages[step] = stages.get(step, 0.0) + sec
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Time per stage:")
    print(stage_table(stages) + "\n")
    print(summarize(storage, layers))
    if bundled_llms(args):
        from ndx_pipeline.core.models import BUNDLED_MODEL_NOTE

        print("\n" + textwrap.fill("Note: " + BUNDLED_MODEL_NOTE, 116))
    ui = f"DAGSTER_HOME={home} dagster dev" if home_was_set else "dagster dev (in this folder)"
    print(f"\nSee the runs in the UI: {ui}")
    return 0


def _storage(args) -> Path:
    from ndx_pipeline.defs.resources import StorageResource

    ensure_dagster_home()
    return StorageResource(storage_dir=args.storage).path()


def cmd_lineage(args) -> int:
    """Print where one neuron's score came from, down to the document text of every scored excerpt."""
    from ndx_pipeline.core.errors import NdxInputError
    from ndx_pipeline.reports.lineage import format_lineage, lineage, lineage_json

    storage = _storage(args)
    runs = None
    try:
        import dagster as dg

        from ndx_pipeline.defs.provenance import stage_runs

        with dg.DagsterInstance.get() as instance:
            runs = stage_runs(instance, args.layer)
    except Exception as exc:  # the Parquet files alone still give the full data lineage
        print(f"note: no Dagster run history ({type(exc).__name__}); showing the data lineage only", file=sys.stderr)
    try:
        result = lineage(storage, args.layer, args.neuron, runs=runs)
    except NdxInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(lineage_json(result) if args.json else format_lineage(result))
    return 0


def cmd_view(args) -> int:
    """(Re)write the static neuron viewer from the stored files and print where it is."""
    from ndx_pipeline.core.errors import NdxInputError
    from ndx_pipeline.reports.viewer import write_viewer

    quiet_libraries()
    storage = _storage(args)
    layers = parse_layers(args.layers) if args.layers else None
    runs = None
    try:
        import dagster as dg

        from ndx_pipeline.reports.lineage import available_layers
        from ndx_pipeline.defs.provenance import stage_runs

        with dg.DagsterInstance.get() as instance:
            runs = {layer: stage_runs(instance, layer) for layer in (layers or available_layers(storage))}
    except Exception:  # no run history: pages still show the data lineage
        runs = None
    try:
        index = write_viewer(storage, layers=layers, runs=runs)
    except NdxInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(index)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ndx-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize corpus → … → scores for some layers and print a summary")
    run.add_argument("--layers", default=DEFAULT_LAYERS, help=f"e.g. 0,5,10 or 0-3 (default {DEFAULT_LAYERS})")
    run.add_argument("--model", help="subject model: HF id (local cache), folder or .gguf (default: bundled)")
    run.add_argument("--corpus", help="folder of .txt/.md, .jsonl or .parquet (default: pydoc_data.topics)")
    run.add_argument("--storage", help="where the Parquet files go (default: $DAGSTER_HOME/storage)")
    run.add_argument("--neurons-per-layer", type=int, dest="neurons_per_layer")
    run.add_argument("--neurons", type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                     help="explicit neuron indices, e.g. 3,17,400")
    run.add_argument("--seed", type=int)
    run.add_argument("--device", help="auto, cpu, cuda …")
    run.add_argument("--batch-size", type=int, dest="batch_size")
    run.add_argument("--candidates", type=int, help="best-of-k: candidate explanations per neuron (default 1)")
    run.add_argument("--baselines", help="comma list of lookup,random,token_list, or none (default: all three)")
    run.add_argument("--explainer-model", dest="explainer_model")
    run.add_argument("--simulator-model", dest="simulator_model")
    lin = sub.add_parser("lineage", help="trace one neuron's score back to its prompt, excerpts and documents")
    lin.add_argument("layer", type=int)
    lin.add_argument("neuron", type=int)
    lin.add_argument("--json", action="store_true", help="machine-readable output")
    lin.add_argument("--storage", help="where the Parquet files are (default: $DAGSTER_HOME/storage)")
    view = sub.add_parser("view", help="write the static HTML neuron viewer and print its index path")
    view.add_argument("--layers", help="layers to (re)write, default every scored layer")
    view.add_argument("--storage", help="where the Parquet files are (default: $DAGSTER_HOME/storage)")
    args = parser.parse_args(argv)
    commands = {"run": cmd_run, "lineage": cmd_lineage, "view": cmd_view}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
