"""The terminal's view of a run (`ndx-pipeline run`): the stages' own lines — progress, per-neuron results,
warnings — one per line with the time and the step, and nothing of Dagster's event stream. A failed step is
summed up by the CLI in one sentence after the run; its full trace stays in the run's event log (the UI, `dagster
debug`) and on the terminal with `ndx-pipeline --verbose run`, which uses Dagster's own console logger instead."""

import logging
import sys

import dagster as dg
from dagster._core.log_manager import LOG_RECORD_METADATA_ATTR

CONSOLE_LOGGER = "ndx_console"
VERBOSE_LOGGER = "console"  # Dagster's own console logger: every event, traces included (`--verbose`)


class StageLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        meta = record.__dict__.get(LOG_RECORD_METADATA_ATTR) or {}
        step = meta.get("step_key")
        text = meta.get("orig_message", record.getMessage())
        when = self.formatTime(record, "%H:%M:%S")
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"[{when}] {step + ': ' if step else ''}{level}{text}"


class WithoutEvents(logging.Filter):
    """Keep what the stages log (info and warnings); drop Dagster's events (step starts and ends, materializations,
    failures with their traces) and the engine's errors (steps skipped after a failure): the run's event log keeps
    them all, and the CLI says what failed in one sentence."""

    def filter(self, record: logging.LogRecord) -> bool:
        meta = record.__dict__.get(LOG_RECORD_METADATA_ATTR) or {}
        return meta.get("dagster_event") is None and record.levelno < logging.ERROR


@dg.logger(config_schema={"log_level": dg.Field(str, default_value="INFO")},
           description="The stages' own lines (progress, results, warnings) without Dagster's event stream.")
def ndx_console(init_context: dg.InitLoggerContext) -> logging.Logger:
    log = logging.Logger("ndx_pipeline.run", level=init_context.logger_config["log_level"].upper())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(StageLines())
    handler.addFilter(WithoutEvents())
    log.addHandler(handler)
    return log


@dg.definitions
def loggers() -> dg.Definitions:
    return dg.Definitions(loggers={CONSOLE_LOGGER: ndx_console, VERBOSE_LOGGER: dg.colored_console_logger})
