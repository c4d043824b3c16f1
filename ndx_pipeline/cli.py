"""`ndx-pipeline`: run the pipeline through Dagster from a terminal, on the same instance the UI shows, one variant
after another (one extraction pass for all their unit sets); compare variants; trace a score to its documents; write
the viewer; export to / import from OpenAI neuron-explainer JSON; move a storage folder from before variants into
one."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
import traceback
import warnings
from pathlib import Path

import dagster as dg
import polars as pl
import sqlalchemy

from ndx_pipeline.core import stages
from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    ASSETS,
    BASELINE_COLUMN_PREFIX,
    BASELINES,
    CORPUS,
    LAYER_ASSETS,
    SCORER_ASSETS,
    SCORES,
    SIMULATED_BASELINES,
    SIMULATIONS,
    STATUS_FAILED,
    TOP_EXCERPTS,
    baseline_column,
)
from ndx_pipeline.core.data.subject_model import HOOK_POINTS, check_layers, hidden_width, mlp_width, num_layers
from ndx_pipeline.core.data.units import DICTIONARY, UNIT_CHOICES, negative_id
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.llm.sent_prompts import OPENAI_KIND
from ndx_pipeline.core.models import AUTO_DTYPE, BUNDLED_MODEL_NOTE, DTYPES, is_bundled
from ndx_pipeline.core.storage import (
    asset_path,
    legacy_layer_files,
    migrate_storage,
    stored_variants,
    variant_layers,
    viewer_dir,
    write_text_atomic,
)
from ndx_pipeline.core.variants import (
    CONTROLS,
    DEFAULT_VARIANT,
    PLANTED_CONTROL,
    RANDOM_WEIGHTS_CONTROL,
    VARIANT_RESOURCES,
    check_name,
    control_name,
    control_of,
    declared_settings,
    default_name,
    planted_settings,
    random_weights_settings,
    record_variant,
    variants_file,
)
from ndx_pipeline.definitions import build_definitions
from ndx_pipeline.defs.automation import MAIN_JOB, ON_DEMAND_ASSETS, folder_state
from ndx_pipeline.defs.checks import JUDGE
from ndx_pipeline.defs.console import CONSOLE_LOGGER, VERBOSE_LOGGER
from ndx_pipeline.defs.partitions import EXTRACT_WITH_TAG, add_variant, contiguous_ranges, range_tags
from ndx_pipeline.defs.pools import (
    INTERRUPTED_TAG,
    PoolWaitExceeded,
    process_tags,
    release_stale_runs,
    waiting_on_pools,
)
from ndx_pipeline.defs.provenance import latest_metadata, record_imported, recorded_subject_model, stage_runs
from ndx_pipeline.defs.resources import SUBJECT_MODEL_ENV, StorageResource, default_resources
from ndx_pipeline.defs.resume import Resume, command_digest, invocation_tags, resumable
from ndx_pipeline.defs.versioning import observe_settings
from ndx_pipeline.reports.compare import RESAMPLES, compare, compare_json, format_compare
from ndx_pipeline.reports.controls import controls_text
from ndx_pipeline.reports.dataset import chosen_variants, write_dataset
from ndx_pipeline.reports.interop import export_layer, import_neuron_records, write_imported
from ndx_pipeline.reports.lineage import available_layers, format_lineage, lineage, lineage_json
from ndx_pipeline.reports.neuronpedia import (
    export_neuronpedia,
    import_neuronpedia,
    write_imported_explanations,
)
from ndx_pipeline.reports.viewer import write_viewer

DEFAULT_LAYERS = "0,1,2"
OPENAI_FORMAT, NEURONPEDIA_FORMAT, DATASET_FORMAT = "openai", "neuronpedia", "dataset"  # export / import --format
EXPORT_FORMATS = (OPENAI_FORMAT, NEURONPEDIA_FORMAT, DATASET_FORMAT)
CONTROLS_STEP = "controls (planted)"  # the control variants' steps, together, in the time per stage
TEMPLATE_INSTANCE = Path(__file__).parent / "templates" / "dagster.yaml"


def instance_settings(home: Path) -> str:
    """The dagster.yaml the CLI writes into a new DAGSTER_HOME (the template with `{home}` filled in)."""
    return TEMPLATE_INSTANCE.read_text(encoding="utf-8").replace("{home}", str(home))


def ensure_dagster_home() -> Path:
    """$DAGSTER_HOME, or `./.dagster_home` when unset; given the project's instance settings when it has none
    (Dagster's own run files under `<home>/dagster`, so `<home>/storage` holds only our data)."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    if not (home / "dagster.yaml").exists():
        write_text_atomic(instance_settings(home), home / "dagster.yaml")
    return home


def parse_layers(text: str) -> list[int]:
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


def run_config(args) -> dict:
    """Run config from the command line: the resources it sets, and the console logger (the stages' own lines;
    Dagster's full event stream, traces included, with --verbose)."""
    resources: dict = {}

    def put(resource, key, value):
        if value is not None:
            resources.setdefault(resource, {"config": {}})["config"][key] = value

    put("storage", "storage_dir", args.storage)
    put("corpus_source", "path", args.corpus)
    put("subject_model", "model", args.model)
    put("subject_model", "device", args.device)
    put("subject_model", "batch_size", args.batch_size)
    put("selection", "units", args.units)
    put("selection", "dictionary", args.dictionary)
    put("selection", "dictionary_hook", args.dictionary_hook)
    if args.dictionary and args.units is None:
        put("selection", "units", DICTIONARY)
    put("selection", "neurons_per_layer", args.neurons_per_layer)
    put("selection", "neurons", args.neurons)
    put("selection", "seed", args.seed)
    put("quality", "explanation_candidates", args.candidates)
    if args.baselines is not None:
        put("quality", "baselines", [b.strip() for b in args.baselines.split(",") if b.strip() not in ("", "none")])
    if args.scorers is not None:
        put("quality", "scorers", [x.strip() for x in args.scorers.split(",") if x.strip() not in ("", "none")])
    put("explainer_llm", "model", args.explainer_model)
    put("simulator_llm", "model", args.simulator_model)
    for llm in ("explainer_llm", "simulator_llm", "scorer_llm"):
        put(llm, "dtype", args.llm_dtype)
    logger = VERBOSE_LOGGER if args.verbose else CONSOLE_LOGGER
    return {"resources": resources, "loggers": {logger: {"config": {"log_level": "INFO"}}}}


def variant_settings(config: dict, declared: dict) -> dict:
    """The settings of the run's variant: each per-variant resource as the definitions bind it (NDX_* variables),
    then the fields the variants file declares for the variant, then the command line's."""
    resources = default_resources()
    given = config["resources"]
    out = {}
    for name in VARIANT_RESOURCES:
        fields = resources[name].model_dump()
        fields.update(declared.get(name, {}))
        fields.update(given.get(name, {}).get("config", {}))
        out[name] = fields
    return out


def chosen_controls(text: str) -> list[str]:
    """The controls `--controls` names (planted, random-weights; none: no control), or one sentence why not."""
    names = [x.strip() for x in (text or "").split(",") if x.strip()]
    if names == ["none"]:
        return []
    unknown = [x for x in names if x not in CONTROLS]
    if unknown or not names:
        raise NdxInputError(f"--controls {text!r}: give a comma list of {', '.join(CONTROLS)}, or none.")
    return names


def run_variants(args) -> list[str]:
    """The variants a run writes, in order: each --variant, else the one its units imply (`neurons`,
    `neurons-both`, the dictionary folder's name)."""
    if args.variant:
        named = [check_name(name, "--variant") for name in args.variant]
        return list(dict.fromkeys(named))
    units = args.units or (DICTIONARY if args.dictionary else default_resources()["selection"].units)
    return [default_name(units, args.dictionary or default_resources()["selection"].dictionary)]


def refuse_legacy_layout(storage: Path) -> None:
    """Layer files from before variants are never ignored and never mixed with a variant's: one sentence saying how
    to move them."""
    old = legacy_layer_files(storage)
    if old:
        raise NdxInputError(f"{storage} holds {len(old)} layer files in the layout from before variants "
                            f"(e.g. {old[0].relative_to(storage)}): move them into a variant with `ndx-pipeline "
                            f"migrate --storage {storage}` first.")


def stopped_layers(result) -> dict[str, dict[int, str]]:
    """asset → {layer: why} for the layers a failed blocking check stopped (the checks' `failed_layers`, each
    with its own reason)."""
    out: dict[str, dict[int, str]] = {}
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            data = event.asset_check_evaluation_data
            if not data.passed and data.severity == dg.AssetCheckSeverity.ERROR:
                meta = {k: getattr(v, "value", v) for k, v in data.metadata.items()}
                asset = data.asset_check_key.asset_key.to_user_string()
                for x in str(meta.get("failed_layers") or "").split(","):
                    if x.strip():
                        reason = meta.get(f"layer_{int(x)}_stopped_by") or data.description
                        out.setdefault(asset, {})[int(x)] = f"{asset} {data.asset_check_key.name}: {reason}"
    return out


def _step_failed(result) -> bool:
    """Whether a step of the run failed for a reason other than a blocking check."""
    return any(event.is_step_failure and not _blocking_check_failure(event) for event in result.all_events)


def _blocking_check_failure(event) -> bool:
    err = event.step_failure_data.error if event.step_failure_data else None
    return err is not None and "DagsterAssetCheckFailedError" in (err.cls_name or "")


def _failed_checks(result, severity: dg.AssetCheckSeverity) -> list[str]:
    out = []
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            data = event.asset_check_evaluation_data
            if not data.passed and data.severity == severity:
                out.append(f"{data.asset_check_key.asset_key.to_user_string()} "
                           f"{data.asset_check_key.name}: {data.description}")
    return out


def failure_message(result) -> str:
    """One sentence: why a run failed (the failed step's own message, or the check that stopped the layer)."""
    stopped = _failed_checks(result, dg.AssetCheckSeverity.ERROR)
    if stopped:
        return "; ".join(stopped)
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data:
            err = event.step_failure_data.user_failure_data
            if err is not None and err.description:
                return f"{event.step_key}: {err.description}"
            if event.step_failure_data.error:
                return f"{event.step_key}: {event.step_failure_data.error.message.strip().splitlines()[0]}"
    error = run_failure_error(result)
    if error is not None:
        return error_sentence(error)
    return "the run failed (see the run's event log: dagster dev, or ndx-pipeline --verbose run)."


def run_failure_error(result):
    """The error that ended a run outright (outside any step), or None."""
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.RUN_FAILURE and event.event_specific_data is not None:
            return getattr(event.event_specific_data, "error", None)
    return None


def error_sentence(error) -> str:
    """An error's own message, without the exception's module and class name."""
    text = error.message.strip()
    head, _, rest = text.partition(": ")
    return (rest if head.endswith(error.cls_name) else text).strip()


def run_warnings(result) -> list[str]:
    """The checks that failed with a warning (e.g. many, but not all, LLM items failed), but the judge's: the
    summary's controls say that once, not once per run and asset."""
    return [w for w in _failed_checks(result, dg.AssetCheckSeverity.WARN) if f" {JUDGE}: " not in w]


def step_seconds(instance, run_id: str) -> dict[str, float]:
    """Wall seconds of each step of a run, from its event log."""
    starts, out = {}, {}
    for entry in instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START,
                                                    dg.DagsterEventType.STEP_SUCCESS}):
        if entry.dagster_event.event_type == dg.DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif entry.step_key in starts:
            out[entry.step_key] = entry.timestamp - starts[entry.step_key]
    return out


def stage_table(seconds: dict[str, float]) -> str:
    total = sum(seconds.values()) or 1.0
    return "\n".join(f"  {k:<20} {v:7.1f} s  {100 * v / total:5.1f} %" for k, v in seconds.items())


def _mean(series) -> str:
    valid = series.drop_nans().drop_nulls()
    return f"{valid.mean():7.3f}" if len(valid) else "    nan"


def summarize(storage: Path, layers: list[int], variant: str) -> str:
    frames = {layer: pl.read_parquet(asset_path(storage, SCORES, layer, variant)) for layer in layers}
    baselines = [baseline_column(b) for b in BASELINES
                 if any(baseline_column(b) in f.columns for f in frames.values())]
    head = f"{'layer':>5}  {'neurons':>7}  {'scored':>6}  {'failed':>6}  {'mean':>7}  {'median':>7}  {'cal_ev':>7}"
    lines = [head + "".join(f"  {col.removeprefix(BASELINE_COLUMN_PREFIX):>10}" for col in baselines)]
    for layer, frame in frames.items():
        valid = frame["score"].drop_nans().drop_nulls()
        median = f"{valid.median():7.3f}" if len(valid) else "    nan"
        failed = int(frame["status"].str.starts_with(STATUS_FAILED).sum())
        ev = _mean(frame["calibrated_ev"]) if "calibrated_ev" in frame.columns else "    nan"
        row = f"{layer:>5}  {len(frame):>7}  {len(valid):>6}  {failed:>6}  {_mean(frame['score'])}  {median}  {ev}"
        row += "".join(f"  {_mean(frame[col]) if col in frame.columns else '    nan':>10}" for col in baselines)
        lines.append(row)
    if baselines:
        lines.append("(mean and median score = pooled Pearson correlation of simulated and true activations; cal_ev ="
                     " the variance the simulation explains once calibrated on each neuron's calibration excerpts; then"
                     " the mean score of each baseline on the same excerpts: lookup = each token's mean activation,"
                     " random = another neuron's explanation, token_list = from the strongest tokens alone)")
    lines += scorer_lines(storage, layers, variant)
    lines.append("")
    lines.append(f"Parquet files: {asset_path(storage, CORPUS)}")
    for asset in LAYER_ASSETS:
        lines.append(f"               {storage / asset / variant}/<layer>.parquet")
    lines.append(f"Neuron viewer: {viewer_dir(storage, variant) / 'index.html'} (open it in a browser, no server "
                 "needed)")
    return "\n".join(lines)


def scorer_lines(storage: Path, layers: list[int], variant: str) -> list[str]:
    """The scorers beside simulation that ran: per layer and scorer, the mean score of our explanations and of the
    random and token-list baselines judged the same way (nothing when none ran)."""
    rows = []
    for layer in layers:
        for name, (_, asset) in SCORER_ASSETS.items():
            path = asset_path(storage, asset, layer, variant)
            frame = pl.read_parquet(path) if path.exists() else None
            if frame is None or frame.is_empty():
                continue
            valid = frame["score"].drop_nans().drop_nulls()
            rows.append(f"{layer:>5}  {name:<10}  {frame['metric'][0]:<17}  {len(frame):>7}  {len(valid):>6}  "
                        f"{_mean(frame['score'])}" + "".join(f"  {_mean(frame[baseline_column(b)]):>10}"
                                                             for b in SIMULATED_BASELINES))
    if not rows:
        return []
    head = (f"{'layer':>5}  {'scorer':<10}  {'metric':<17}  {'neurons':>7}  {'scored':>6}  {'mean':>7}"
            + "".join(f"  {b:>10}" for b in SIMULATED_BASELINES))
    return ["", "Scorers beside simulation (held-out excerpts; 0.5 is chance):", head, *rows,
            "(detection / fuzzing: balanced accuracy of the scorer LLM's verdicts on held-out excerpts; embedding: ROC"
            " AUC of their similarity to the explanation; random and token_list: those baselines' explanations judged"
            " the same way)"]


def cost_lines(instance: dg.DagsterInstance, layers: list[int], variant: str) -> list[str]:
    """What the LLM stages of the latest runs of `layers` sent to a server per item, from their partitions' metadata
    (answers from the cache cost nothing): requests and prompt tokens per simulated excerpt (and the value scale
    asked for) and, for the scorers, per unit; one line per stage and wave. Nothing for in-process models, whose
    cost is the time per stage above, nor when nothing was sent."""
    rows, seen = [], set()
    for asset, per in ((SIMULATIONS, "excerpt"), *((judged, "unit") for judged, _ in SCORER_ASSETS.values())):
        for layer in layers:
            meta = latest_metadata(instance, asset, layer, variant)
            wave = (asset, meta.get("llm_accounting_covers_layers", str(layer)))
            served = str(meta.get("simulator") or meta.get("scorer") or "").startswith(f"{OPENAI_KIND}:")
            if not served or not meta.get(f"llm_requests_per_{per}") or wave in seen:
                continue
            seen.add(wave)
            scale = f" ({meta['simulator_scale']} scale)" if meta.get("simulator_scale") else ""
            rows.append(f"  {asset:<20} {meta[f'llm_requests_per_{per}']:7.2f} requests, "
                        f"{meta[f'prompt_tokens_per_{per}']:8.0f} prompt tokens per {per}{scale}; layers {wave[1]}")
    return ["", "Sent to LLM servers by this run (answers from the cache cost none):", *rows] if rows else []


def bundled_llms(args) -> bool:
    """Whether the explainer or simulator of this run is the bundled SmolLM2 (in-process, no model given)."""
    resources = default_resources()
    return any(getattr(args, f"{stage}_model") is None and resources[f"{stage}_llm"].backend == "local"
               and is_bundled(resources[f"{stage}_llm"].model) for stage in ("explainer", "simulator"))


def quiet_libraries() -> None:
    """Keep the terminal for our progress: no beta warnings from Dagster, no weight-loading bars."""
    warnings.filterwarnings("ignore", message=".*is currently in beta.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _selection(definitions: dg.Definitions, start: str | None) -> dg.AssetSelection:
    """Every asset of the main job, or `start` and everything downstream of it; never those materialized on demand
    (`release`)."""
    on_demand = dg.AssetSelection.assets(*ON_DEMAND_ASSETS)
    if start is None:
        return dg.AssetSelection.all() - on_demand
    graph = definitions.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_materializable}
    if start not in keys:
        raise NdxInputError(f"--from {start!r} is not an asset (assets: {', '.join(ASSETS)}).")
    if start in ON_DEMAND_ASSETS:
        raise NdxInputError(f"--from {start}: {start} is materialized on demand (the UI, or `dagster asset "
                            f"materialize --select {start}`), not by ndx-pipeline run; for the dataset export use "
                            "ndx-pipeline export --format dataset.")
    return dg.AssetSelection.assets(start).downstream() - on_demand


def cmd_run(args) -> int:
    quiet_libraries()
    home_was_set = bool(os.environ.get("DAGSTER_HOME"))
    home = ensure_dagster_home()
    if args.model:
        os.environ[SUBJECT_MODEL_ENV] = args.model
    layers = check_layers(args.model, parse_layers(args.layers))
    stages.corpus(args.corpus or default_resources()["corpus_source"].path)  # a bad corpus: one sentence, now
    variants = run_variants(args)
    wanted = chosen_controls(args.controls)
    storage = _storage(args)
    refuse_legacy_layout(storage)
    definitions = build_definitions()
    graph = definitions.resolve_asset_graph()
    selection = _selection(definitions, args.start).resolve(graph)
    job = definitions.resolve_job_def(MAIN_JOB)
    config = run_config(args)
    # variant → its planted control (run first, on one layer: the rules are the same at every layer) and its
    # random-weight control (run after it, on the same layers)
    controls: dict[str, str] = {}
    randomized: dict[str, str] = {}
    for variant in variants:
        settings = variant_settings(config, declared_settings(storage, variant))
        if record_variant(variants_file(storage), variant, settings):
            print(f"variant {variant}: settings recorded in {variants_file(storage)}", flush=True)
        if control_of(variant):
            continue
        if PLANTED_CONTROL in wanted:
            controls[variant] = control_name(variant)
            record_variant(variants_file(storage), controls[variant], planted_settings(settings))
        if RANDOM_WEIGHTS_CONTROL in wanted:
            randomized[variant] = control_name(variant, RANDOM_WEIGHTS_CONTROL)
            record_variant(variants_file(storage), randomized[variant], random_weights_settings(settings))
    named = f"variant {variants[0]}" if len(variants) == 1 else f"variants {', '.join(variants)}"
    print(f"ndx-pipeline: {named}, layers {layers} on instance {home}; Parquet under {storage}"
          + (f"; controls {', '.join(controls.values())} on layer {min(layers)}" if controls else "")
          + (f"; random-weight controls {', '.join(randomized.values())}" if randomized else ""), flush=True)
    started = time.perf_counter()
    step_time: dict[str, float] = {}
    failed: dict[str, dict[int, str]] = {}  # variant → layer → why it stopped (the other layers go on)
    errors: list[str] = []  # a variant whose run failed outright (the other variants go on)
    with dg.DagsterInstance.get() as instance, waiting_on_pools(say, checked_wait(args.wait)):
        tell_released(instance)
        digest = command_identity(args, config, storage, layers, variants, [*controls.values(), *randomized.values()],
                                  graph)
        resume = resumable(instance, digest)
        if resume is not None:
            print(f"resuming this command from run {resume.interrupted[:8]}, {resume.why}: the steps it finished are "
                  "kept, the LLM answers it had received come from the cache", flush=True)
        run_tags = {**process_tags(), **invocation_tags(digest, resume)}
        for variant in [*variants, *controls.values(), *randomized.values()]:
            add_variant(instance, variant)
            changed = observe_settings(instance, storage, variant)  # before the runs: they record what they ran with
            if changed and instance.get_materialized_partitions(dg.AssetKey(ACTIVATION_RECORDS)):
                print(f"variant {variant}: new settings for its {', '.join(changed)} stages", flush=True)
        for i, variant in enumerate(variants):
            def run_control(control: str, on: list[int]) -> str | None:  # the whole graph, its time apart
                control_time: dict[str, float] = {}
                error = run_layers(job, instance, config, control, on, selection, True, run_tags, control_time,
                                   failed.setdefault(control, {}), resume)
                step_time[CONTROLS_STEP] = step_time.get(CONTROLS_STEP, 0.0) + sum(control_time.values())
                if error:
                    errors.append(error)
                return error

            if variant in controls:  # (its extraction costs no forward pass; its LLM answers are cached)
                run_control(controls[variant], [min(layers)])
            # the first variant's extraction pass reads the unit sets of the variants after it too: one pass for all
            joint = {EXTRACT_WITH_TAG: ",".join(variants[i + 1:])} if i == 0 and len(variants) > 1 else {}
            error = run_layers(job, instance, config, variant, layers, selection, args.start is None,
                               {**run_tags, **joint}, step_time, failed.setdefault(variant, {}), resume)
            if error and len(variants) == 1 and not (controls or randomized):  # its one sentence is all to say
                print(f"error: {error.split(': ', 1)[1]}", file=sys.stderr)
                return 1
            if error:
                errors.append(error)
            if variant in randomized and not error:  # the same units and settings, on re-initialized weights
                run_control(randomized[variant], layers)
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Time per stage:")
    print(stage_table(step_time) + "\n")
    for variant in variants:
        scored = [layer for layer in layers if layer not in failed[variant]]
        if scored and not any(e.startswith(f"variant {variant}:") for e in errors):
            print(summarize(storage, scored, variant))
            with dg.DagsterInstance.get() as instance:
                costs = cost_lines(instance, scored, variant)
            if costs:
                print("\n".join(costs))
        lines = controls_text(storage, variant) if variant in controls or variant in randomized else []
        if lines:
            print("\n" + "\n".join(lines))
    if bundled_llms(args):
        print("\n" + textwrap.fill("Note: " + BUNDLED_MODEL_NOTE, 116))
    ui = f"DAGSTER_HOME={home} dagster dev" if home_was_set else "dagster dev (in this folder)"
    print(f"\nSee the runs in the UI: {ui}")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    for variant in failed:
        for layer, why in sorted(failed[variant].items()):
            print(f"error: layer {layer} of variant {variant} failed: {why}", file=sys.stderr)
    return 1 if errors or any(failed.values()) else 0


def run_layers(job, instance, config: dict, variant: str, layers: list[int], selection, whole: bool, tags: dict,
               step_time: dict[str, float], failed: dict[int, str], resume: Resume | None = None) -> str | None:
    """Run `variant` over `layers` (one run per contiguous range, `tags` on each); the layers a blocking check
    stopped go in `failed` with their reasons, while the other layers go on; a run that failed outright ends the
    variant with one sentence, `variant <name>: <why>` (returned). `resume`: what an interrupted invocation of the
    same command finished, left out. A run stopped by SIGTERM / Ctrl-C, or one that waited longer than --wait for a
    pool slot, ends the command (`RunStopped`)."""
    work = [(lo, hi, selection) for lo, hi in contiguous_ranges(layers)]
    while work:
        lo, hi, subset = work.pop(0)
        if resume is not None:
            subset, kept = resume.left(variant, lo, hi, subset)
            if kept:
                print(kept, flush=True)
            if not subset:
                continue
        result = job.execute_in_process(run_config=config, instance=instance,
                                        tags={**tags, **range_tags(variant, lo, hi)}, raise_on_error=False,
                                        asset_selection=None if subset == selection and whole else list(subset))
        stop_if_ended_early(instance, result)
        for warning in run_warnings(result):
            print(f"warning: {warning}", file=sys.stderr)
        for step, sec in step_seconds(instance, result.run_id).items():
            step_time[step] = step_time.get(step, 0.0) + sec
        if result.success:
            print(f"run {result.run_id} succeeded ({variant}, layers {lo}–{hi})", flush=True)
            continue
        stopped = stopped_layers(result)
        if not stopped or _step_failed(result):
            return f"variant {variant}: {failure_message(result)}"
        # a blocking check stopped some layers: the others go on with the assets after the checked ones
        for at in stopped.values():
            for layer, why in at.items():
                failed.setdefault(layer, why)
        print(f"run {result.run_id}: layers {sorted(failed)} of {variant} stopped by a failed check; the other "
              "layers go on", file=sys.stderr, flush=True)
        rest = [layer for layer in range(lo, hi + 1) if layer not in failed]
        # what the check held back: the selected steps the run skipped (whole steps, so never half a multi-asset)
        after = set(subset) - {event.asset_key for event in result.all_events
                               if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION}
        if after:
            work += [(a, b, after) for a, b in contiguous_ranges(rest)]
    return None


class RunStopped(Exception):
    """A run ended the command: stopped by SIGTERM or Ctrl-C, or it waited longer than --wait for a pool slot."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def stop_if_ended_early(instance, result) -> None:
    """Raise RunStopped when the run was stopped by a signal (marked canceled) or gave up waiting for a slot."""
    run = instance.get_run_by_id(result.run_id)
    if run.status == dg.DagsterRunStatus.CANCELED and INTERRUPTED_TAG in run.tags:
        raise RunStopped(f"run {run.run_id[:8]} was {run.tags[INTERRUPTED_TAG]}: marked canceled and its pool slots "
                         "released; the same command again resumes it", 130)
    error = run_failure_error(result)
    if error is not None and error.cls_name == PoolWaitExceeded.__name__:
        raise RunStopped(error_sentence(error), 1)


def checked_wait(seconds: float | None) -> float | None:
    """--wait: None (as long as it takes) or a number of seconds, 0 or more."""
    if seconds is not None and not seconds >= 0:
        raise NdxInputError(f"--wait {seconds:g}: give a number of seconds, 0 or more.")
    return seconds


def say(line: str) -> None:
    """A line of the run on the terminal, as the console logger writes the stages' lines."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def tell_released(instance, file=None) -> None:
    """Release the instance's runs whose process is gone (and the slots ended runs still hold): one line each."""
    for line in release_stale_runs(instance):
        print(line, file=file or sys.stdout, flush=True)


def command_identity(args, config: dict, storage: Path, layers: list[int], variants: list[str], controls: list[str],
                     graph) -> str:
    """The digest of what this `run` command computes (`defs.resume`): the same command on unchanged settings,
    code and corpus has the same digest."""
    corpus = args.corpus or default_resources()["corpus_source"].path
    return command_digest(
        layers=layers, variants=variants, controls=controls, start=args.start, resources=config["resources"],
        settings={v: variant_settings(config, declared_settings(storage, v)) for v in [*variants, *controls]},
        defaults={name: resource.model_dump() for name, resource in default_resources().items()},
        code_versions={k.to_user_string(): graph.get(k).code_version for k in graph.get_all_asset_keys()},
        corpus=folder_state(Path(corpus)) if corpus and Path(corpus).exists() else corpus)


def _storage(args) -> Path:
    """Where the Parquet files are: --storage, else where the pipeline's resources put them (NDX_STORAGE, else
    $DAGSTER_HOME/storage)."""
    ensure_dagster_home()
    return StorageResource(storage_dir=args.storage or default_resources()["storage"].storage_dir).path()


def _runs(layers, variant: str) -> dict[int, dict] | None:
    """Stage → run info for each layer of `variant`, from the Dagster instance; None when there is no run history."""
    try:
        with dg.DagsterInstance.get() as instance:
            tell_released(instance, sys.stderr)
            return {layer: stage_runs(instance, layer, variant) for layer in layers}
    except Exception as exc:  # the Parquet files alone still give the full data lineage
        print(f"note: no Dagster run history ({type(exc).__name__}); showing the data lineage only", file=sys.stderr)
        return None


def chosen_variant(storage: Path, given: str | None, asset: str = SCORES) -> str:
    """--variant, else the only variant of `storage` with files of `asset` (its controls, `<variant>.planted` …, are
    not candidates); several or none: one sentence saying which there are."""
    refuse_legacy_layout(storage)
    if given:
        return check_name(given, "--variant")
    found = [v for v in stored_variants(storage, asset) if not control_of(v)] or stored_variants(storage, asset)
    if len(found) == 1:
        return found[0]
    if not found:
        raise NdxInputError(f"no variant under {storage} has {asset}: run the pipeline first.")
    raise NdxInputError(f"{len(found)} variants have {asset} ({', '.join(found)}): say which with --variant.")


def cmd_lineage(args) -> int:
    """Print where one unit's score came from, down to the document text of every scored excerpt. The variant:
    --variant, else the only one that has a score for the unit (or the only one there is)."""
    storage = _storage(args)
    unit = negative_id(args.neuron) if args.negative else args.neuron
    variant = args.variant
    if not variant:
        refuse_legacy_layout(storage)
        having = [v for v in stored_variants(storage, SCORES)
                  if asset_path(storage, SCORES, args.layer, v).exists() and unit in pl.read_parquet(
                      asset_path(storage, SCORES, args.layer, v), columns=["neuron"])["neuron"].to_list()]
        if len(having) > 1:
            raise NdxInputError(f"{len(having)} variants have unit {unit} of layer {args.layer} ({', '.join(having)})"
                                ": say which with --variant.")
        variant = having[0] if having else None  # none: the only variant there is says what it lacks
    variant = chosen_variant(storage, variant)
    runs = _runs([args.layer], variant)
    result = lineage(storage, args.layer, unit, runs=runs[args.layer] if runs else None, variant=variant)
    print(lineage_json(result) if args.json else format_lineage(result))
    return 0


def cmd_view(args) -> int:
    """(Re)write the static neuron viewer of a variant from the stored files (and the index of every variant, with
    the compare page) and print where it is."""
    quiet_libraries()
    storage = _storage(args)
    variant = chosen_variant(storage, args.variant)
    layers = parse_layers(args.layers) if args.layers else None
    runs = _runs(layers or available_layers(storage, variant=variant), variant)
    print(write_viewer(storage, layers=layers, runs=runs, variant=variant))
    return 0


def cmd_export(args) -> int:
    """Write a variant's layers in Neuronpedia's export layout, or in OpenAI neuron-explainer's JSON shapes
    (NeuronRecord, NeuronSimulationResults), or all variants (or one) as a dataset release with its card."""
    storage = _storage(args)
    if args.format == DATASET_FORMAT:
        return export_dataset(args, storage)
    variant = chosen_variant(storage, args.variant, ACTIVATION_RECORDS)
    layers = (parse_layers(args.layers) if args.layers else
              available_layers(storage, ACTIVATION_RECORDS, variant=variant))
    if not layers:
        raise NdxInputError(f"no layer of variant {variant} has activation_records under {storage}: run the "
                            "pipeline first.")
    if args.format == NEURONPEDIA_FORMAT:
        return export_to_neuronpedia(args, storage, variant, layers)
    for layer in layers:
        done = export_layer(storage, layer, args.out, neurons=args.neurons, variant=variant)
        print(f"layer {layer}: {len(done.neuron_records)} NeuronRecords, {len(done.simulation_results)} "
              f"NeuronSimulationResults of variant {variant} under {Path(args.out).resolve()}")
    return 0


def export_dataset(args, storage: Path) -> int:
    """`export --format dataset`: every variant (or --variant, with its controls) as one Parquet file per asset kind
    and a dataset card; the subject model named as the runs that made the records recorded it."""
    variants = [check_name(args.variant, "--variant")] if args.variant else None
    layers = parse_layers(args.layers) if args.layers else None
    chosen, model = chosen_variants(storage, variants), None
    try:
        with dg.DagsterInstance.get() as instance:
            model = recorded_subject_model(instance, {v: variant_layers(storage, ACTIVATION_RECORDS, v)
                                                      for v in chosen})
    except Exception as exc:  # the files alone still make the export; the card then says the model is not recorded
        print(f"note: no Dagster run history ({type(exc).__name__}); the card names no subject model",
              file=sys.stderr)
    done = write_dataset(storage, args.out, variants=variants, layers=layers, about={"subject_model": model},
                         log=print)
    for kind, rows in done.rows.items():
        print(f"{kind}: {rows} rows")
    print(f"dataset export of {', '.join(done.variants)} under {done.out} (card: {done.out / 'README.md'})")
    return 0


def export_to_neuronpedia(args, storage: Path, variant: str, layers: list[int]) -> int:
    """`export --format neuronpedia`: the variant's layers, with what the files cannot say about the model (its
    name, layers, widths) and the runs that wrote each layer (the scores' lineage) from the instance."""
    runs = _runs(layers, variant) or {}
    model = next((info.get("subject_model") for stages_of in runs.values()
                  for info in [stages_of.get(ACTIVATION_RECORDS) or {}] if info.get("subject_model")), None)
    corpus = next((info.get("source") for stages_of in runs.values() for info in [stages_of.get(CORPUS) or {}]
                   if info.get("source")), None)
    about = {"subject_model": model, "corpus": corpus}
    try:
        configured = default_resources()["subject_model"].model
        about.update(layers=num_layers(configured), neurons_per_layer=mlp_width(configured),
                     dimension=hidden_width(configured))
    except NdxInputError:
        pass  # a model that cannot be read here: the model row leaves its sizes out
    model_id = check_name(args.model_id or (model or "model").split(":")[-1].lower(), "--model-id")
    done = export_neuronpedia(storage, args.out, model_id=model_id, variant=variant,
                              set_name=check_name(args.source_id or variant, "--source-id"), layers=layers, runs=runs,
                              about=about, creator_id=args.creator_id)
    for source, counts in done.sources.items():
        print(f"{source}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind != "ndx"))
    print(f"Neuronpedia export of variant {variant} under {done.root}")
    return 0


def cmd_import(args) -> int:
    """Read NeuronRecord JSON (ours, or OpenAI's released collated activations) or a Neuronpedia-shaped export as a
    variant's activation_records (and its explanations and output tokens, when the export has them), record the
    files as materializations on the instance, and say how to go on from there."""
    storage = _storage(args)
    refuse_legacy_layout(storage)
    variant = check_name(args.variant or "imported", "--variant")
    chosen = parse_layers(args.layers) if args.layers else None
    if args.format == NEURONPEDIA_FORMAT:
        imported = import_neuronpedia(args.source, layers=chosen)
        written = write_imported(storage, imported, variant=variant)
        written += write_imported_explanations(storage, imported, variant=variant)
    else:
        imported = import_neuron_records(args.source, layers=chosen)
        written = write_imported(storage, imported, variant=variant)
    with dg.DagsterInstance.get() as instance:
        record_imported(instance, written, source=str(Path(args.source).resolve()))
    for asset, layer, _, path in written:
        print(f"{asset}{'' if layer is None else f' layer {layer}'}: {path}")
    layers = ",".join(str(x) for x in imported.layers())
    print(f"\nNext: ndx-pipeline run --variant {variant} --layers {layers} --from {TOP_EXCERPTS}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ndx-pipeline", description=__doc__)
    top.add_argument("--verbose", action="store_true", help="show the full trace of an error")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize corpus → … → scores for some layers and print a summary")
    run.add_argument("--layers", default=DEFAULT_LAYERS, help=f"e.g. 0,5,10 or 0-3 (default {DEFAULT_LAYERS})")
    run.add_argument("--variant", action="append",
                     help="the variant this run writes (default: from the units: neurons, neurons-negative, "
                          "neurons-both, or the dictionary folder's name); its settings are recorded in the variants "
                          "file. Repeat it to run several variants, one after the other, with one extraction pass for "
                          "all their unit sets; the other options then apply to each of them")
    run.add_argument("--controls", default=PLANTED_CONTROL,
                     help="comma list of planted, random-weights, or none. planted (default): before each variant, "
                          "its control variant <variant>.planted on the first layer: units whose activation is a "
                          "known token rule, each judged with its true and a wrong explanation, so the summary says "
                          "whether the simulator and scorers tell right from wrong; random-weights: after each "
                          "variant, <variant>.random-weights, the same units on the subject model with "
                          "re-initialized weights (as long as the variant itself), so the summary says how much of "
                          "each score training accounts for")
    run.add_argument("--from", dest="start", metavar="ASSET",
                     help="materialize only this asset and everything downstream (e.g. top_excerpts after import)")
    run.add_argument("--model", help="subject model: HF id (local cache), folder or .gguf (default: bundled)")
    run.add_argument("--corpus", help="folder of .txt/.md, .jsonl or .parquet (default: pydoc_data.topics)")
    run.add_argument("--storage",
                     help="where the Parquet files go (default: $NDX_STORAGE, else $DAGSTER_HOME/storage)")
    run.add_argument("--units", choices=UNIT_CHOICES,
                     help="positive (default) | negative | both sides of MLP neurons, or dictionary latents")
    run.add_argument("--dictionary", help="a SAELens or sparsify dictionary folder (or a folder of them, one per "
                                          "layer): explain its latents")
    run.add_argument("--dictionary-hook", dest="dictionary_hook", choices=HOOK_POINTS,
                     help="where the dictionary reads, when its files do not say")
    run.add_argument("--neurons-per-layer", type=int, dest="neurons_per_layer",
                     help="neurons (or latents) per layer, seeded; -1: all")
    run.add_argument("--neurons", type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                     help="explicit neuron indices, e.g. 3,17,400")
    run.add_argument("--seed", type=int)
    run.add_argument("--device", help="auto, cpu, cuda …")
    run.add_argument("--batch-size", type=int, dest="batch_size")
    run.add_argument("--candidates", type=int, help="best-of-k: candidate explanations per neuron (default 1)")
    run.add_argument("--baselines", help="comma list of lookup,random,token_list, or none (default: all three)")
    run.add_argument("--scorers", help="comma list of detection,fuzzing,embedding (beside simulation), or none "
                                       "(default: embedding)")
    run.add_argument("--explainer-model", dest="explainer_model")
    run.add_argument("--simulator-model", dest="simulator_model")
    run.add_argument("--wait", type=float, metavar="SECONDS",
                     help="how long a run may wait for a pool slot (llm, subject_model) that another live run holds "
                          "before it fails saying which run holds it (default: as long as it takes; 0: fail at "
                          "once). A waiting run says so every 10 s")
    run.add_argument("--llm-dtype", dest="llm_dtype", choices=(AUTO_DTYPE, *DTYPES),
                     help="precision of the in-process LLMs: auto (default: whichever of bfloat16 and float32 "
                          "a short calibration on first load measures faster on this machine, cached per machine "
                          "and model), float32 (exact), bfloat16, float16")
    lin = sub.add_parser("lineage", help="trace one neuron's score back to its prompt, excerpts and documents")
    lin.add_argument("layer", type=int)
    lin.add_argument("neuron", type=int, help="the unit id: a neuron's index (its negative side: -1 - index, or "
                                               "the index with --negative), or a dictionary latent's index")
    lin.add_argument("--negative", action="store_true", help="the negative side of neuron NEURON")
    lin.add_argument("--json", action="store_true", help="machine-readable output")
    view = sub.add_parser("view", help="write the static HTML neuron viewer and print its index path")
    view.add_argument("--layers", help="layers to (re)write, default every scored layer")
    export = sub.add_parser("export", help="write a variant's layers for other tools: Neuronpedia's export layout, "
                                           "or OpenAI neuron-explainer JSON (NeuronRecord, …)")
    export.add_argument("out", help="output folder")
    export.add_argument("--format", choices=EXPORT_FORMATS, default=OPENAI_FORMAT,
                        help="openai (default): collated-activations/, explanations/, ndx-provenance/; neuronpedia: "
                             "<model-id>/<layer>-<source-id>/{features,activations,explanations,scores}/"
                             "batch-N.jsonl.gz; dataset: README.md (the card) and data/*.parquet, one file per asset "
                             "kind across layers and variants (every variant, or --variant with its controls)")
    export.add_argument("--layers", help="default: every layer with activation records")
    export.add_argument("--neurons", type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                        help="openai: only these neurons, e.g. 3,17")
    export.add_argument("--model-id", help="neuronpedia: the model's id there (e.g. gpt2-small); default: the subject "
                                           "model's name")
    export.add_argument("--source-id", help="neuronpedia: the set name of the sources, <layer>-<source-id> (e.g. "
                                            "res-jb); default: the variant's name")
    export.add_argument("--creator-id", default="ndx-pipeline", help="neuronpedia: creatorId / authorId of the rows")
    imp = sub.add_parser("import", help="read NeuronRecord JSON files, or a Neuronpedia-shaped export, as a variant's "
                                        "activation_records (and explanations, when the export has them)")
    imp.add_argument("source", help="openai: a <neuron>.json, a layer folder, or an export root with "
                                    "collated-activations/; neuronpedia: an export root, a model folder or a source "
                                    "folder")
    imp.add_argument("--format", choices=(OPENAI_FORMAT, NEURONPEDIA_FORMAT), default=OPENAI_FORMAT)
    imp.add_argument("--layers", help="only these layers")
    comp = sub.add_parser("compare", help="variants side by side: scores per layer and pooled, differences with "
                                          "bootstrap intervals")
    comp.add_argument("variants", nargs="*", metavar="VARIANT", help="default: every variant with scores")
    comp.add_argument("--layers", help="e.g. 0,5 or 0-3 (default: every layer a chosen variant has scores for)")
    comp.add_argument("--json", action="store_true", help="machine-readable output")
    comp.add_argument("--resamples", type=int, default=RESAMPLES, help=f"bootstrap resamples (default {RESAMPLES})")
    comp.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default 0)")
    mig = sub.add_parser("migrate", help="move layer files from the layout before variants (<asset>/<layer>.parquet) "
                                         "into a variant, ids scoped to it, and record them on the instance")
    mig.add_argument("--variant", help=f"the variant they become (default {DEFAULT_VARIANT})")
    for p in (lin, view, export):
        p.add_argument("--variant", help="the variant (default: the only one there is, else say which)")
    imp.add_argument("--variant", help="the variant the records become (default: imported)")
    for p in (lin, view, export, imp, mig, comp):
        p.add_argument("--storage",
                       help="where the Parquet files are (default: $NDX_STORAGE, else $DAGSTER_HOME/storage)")
    return top


def cmd_compare(args) -> int:
    """Print variants side by side: their scores per layer and pooled, and their differences with bootstrap
    intervals (paired over the units they share)."""
    storage = _storage(args)
    refuse_legacy_layout(storage)
    result = compare(storage, args.variants, parse_layers(args.layers) if args.layers else None,
                     resamples=args.resamples, seed=args.seed)
    print(compare_json(result) if args.json else format_compare(result))
    return 0


def cmd_migrate(args) -> int:
    """Move a storage folder's layer files from before variants into one variant: each file rewritten with its ids
    scoped to the variant, the viewer's pages moved, the files recorded as materializations of the variant's
    partitions; says what it did."""
    storage = _storage(args)
    variant = check_name(args.variant or DEFAULT_VARIANT, "--variant")
    moved = migrate_storage(storage, variant)
    if not moved:
        print(f"nothing to move: {storage} holds no layer files in the layout from before variants")
        return 0
    with dg.DagsterInstance.get() as instance:
        add_variant(instance, variant)
        record_imported(instance, [(a, layer, variant, path) for a, layer, path in moved],
                        source=f"{storage} (layout before variants)")
    for asset, layer, path in moved:
        print(f"{asset} layer {layer} -> {path}")
    print(f"\nMoved {len(moved)} files into variant {variant} (ids prefixed with '{variant}/'); recorded on the "
          "instance as its partitions.")
    return 0


COMMANDS = {"run": cmd_run, "lineage": cmd_lineage, "view": cmd_view, "export": cmd_export, "import": cmd_import,
            "compare": cmd_compare, "migrate": cmd_migrate}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except NdxInputError as e:  # bad input: one sentence naming it, and nothing else
        if args.verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # stopped by a signal, or gave up waiting for a pool slot: one sentence
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except sqlalchemy.exc.OperationalError as e:
        if SQLITE_LOCKED not in str(e):
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"error: {instance_locked()}", file=sys.stderr)
        return 1


SQLITE_LOCKED = "database is locked"


def instance_locked() -> str:
    """Why a command could not read or write a sqlite instance that another process keeps locked, in one sentence."""
    home = os.environ.get("DAGSTER_HOME", "$DAGSTER_HOME")
    return (f"the Dagster instance's sqlite files under {home} stayed locked: another process (a run stopped with "
            "Ctrl-Z, a stuck `dagster dev`) is in the middle of writing them; resume or end it and run the command "
            "again (many runs at once: put the instance on Postgres, README \"Several machines\").")


if __name__ == "__main__":
    sys.exit(main())
