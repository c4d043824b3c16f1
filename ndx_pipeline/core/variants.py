"""Variants: named setups of what is explained and how, kept side by side in one storage folder.

A variant is a name and the settings of the per-variant resources (`VARIANT_RESOURCES`: which units, how many
excerpts, the explainer, simulator, scorers and method settings). The subject model, the corpus and the storage are
the instance's, shared by every variant. Every layer file of a variant lives at
`<storage>/<asset>/<variant>/<layer>.parquet`, so no variant ever writes over another's.

The variants file (`variants.yaml`, name → resource → field → value; `$NDX_VARIANTS`, else `<storage>/variants.yaml`)
says what each variant is. `ndx-pipeline run --variant NAME` records there the settings it ran with; a user may
write entries by hand, naming only the fields that differ from the configured resources. A run of a variant's
partition applies the variant's fields over the run's resources.

Two variants whose extraction settings are equal (`extraction_key`: subject model, corpus, unit set, record counts)
share one extraction: the second one's activation records are the first one's file (a hard link), found through the
Dagster instance, and no forward pass of the subject model is run for it. Variants whose unit sets differ, run
together, share the pass instead: the first one's pass reads the others' unit sets too, and their runs take what was
read for them (`defs/assets/extraction.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.storage import write_text_atomic

VARIANTS_ENV = "NDX_VARIANTS"
VARIANTS_FILE = "variants.yaml"
# the resources whose settings a variant holds (the others are the instance's: storage, corpus, subject model)
VARIANT_RESOURCES = ("selection", "quality", "explainer_llm", "simulator_llm", "scorer_llm", "embedder")
# settings not recorded with a variant: those that never change what a stage writes (how fast), and the name of the
# variable holding an API key (the environment's, where the run executes: nothing about keys is ever written here)
NOT_RECORDED = {"max_concurrency", "timeout_s", "deadline_s", "max_attempts", "api_key_env"}
# the selection fields that change the extraction pass (the split counts only change top_excerpts)
EXTRACTION_FIELDS = ("units", "dictionary", "dictionary_hook", "neurons_per_layer", "neurons", "seed", "top_k",
                     "random_k", "quantile_k", "subject_weights")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED = {"index.html", "compare.html"}  # the viewer's pages beside the variants' folders


def check_name(name: str, what: str = "variant name") -> str:
    """`name`, or one sentence saying why it cannot name a variant (it is a partition key and a folder name)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED:
        raise NdxInputError(f"{what} {name!r} is not usable: letters, digits, '.', '_' and '-' only, starting with a "
                            "letter or digit, at most 64 characters.")
    return name


def default_name(units: str, dictionary: str | None = None) -> str:
    """The name a run's variant gets when none is given: `neurons` (the positive side, the paper's units),
    `neurons-negative`, `neurons-both`, or the dictionary folder's name."""
    if units == "dictionary" and dictionary:
        folder = Path(dictionary).expanduser().name or "dictionary"
        cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder).strip("-._") or "dictionary"
        return check_name(cleaned[:64])
    return "neurons" if units in (None, "positive") else f"neurons-{units}"


DEFAULT_VARIANT = default_name("positive")


def implied_settings(name: str) -> dict[str, dict[str, Any]]:
    """The settings a variant's name implies when the variants file does not declare it: the neuron sides'
    default names (`neurons-negative`, `neurons-both`) say which side; any other name, nothing."""
    for units in ("negative", "both"):
        if name == default_name(units):
            return {"selection": {"units": units}}
    return {}


def variants_file(storage_dir: str | os.PathLike) -> Path:
    """Where the variants are declared: `$NDX_VARIANTS`, else `<storage>/variants.yaml`."""
    return Path(os.environ.get(VARIANTS_ENV) or Path(storage_dir) / VARIANTS_FILE).expanduser()


def read_variants(path: str | os.PathLike) -> dict[str, dict[str, dict[str, Any]]]:
    """name → resource → field → value, from the variants file (empty when there is none); a malformed file is one
    sentence naming it and what is wrong."""
    import yaml

    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise NdxInputError(f"variants file {path} is not readable YAML ({type(e).__name__}).") from None
    if not isinstance(data, dict):
        raise NdxInputError(f"variants file {path} must map variant names to settings.")
    out = {}
    for name, settings in data.items():
        check_name(str(name), f"variant name in {path}:")
        settings = settings or {}
        if not isinstance(settings, dict):
            raise NdxInputError(f"variants file {path}: variant {name!r} must map resources to fields.")
        unknown = sorted(set(settings) - set(VARIANT_RESOURCES))
        if unknown:
            raise NdxInputError(f"variants file {path}: variant {name!r} sets {unknown}, which a variant cannot "
                                f"set (it may set {', '.join(VARIANT_RESOURCES)}).")
        for resource, fields in settings.items():
            if not isinstance(fields or {}, dict):
                raise NdxInputError(f"variants file {path}: {name}.{resource} must map fields to values.")
        out[str(name)] = {resource: dict(fields or {}) for resource, fields in settings.items()}
    return out


def declared_settings(storage_dir: str | os.PathLike, variant: str) -> dict[str, dict[str, Any]]:
    """What `variant` is: its entry in the variants file (even an empty one), else what its name implies."""
    declared = read_variants(variants_file(storage_dir)).get(variant)
    return implied_settings(variant) if declared is None else declared


def record_variant(path: str | os.PathLike, name: str, settings: Mapping[str, Mapping[str, Any]]) -> bool:
    """Declare (or re-declare) variant `name` with `settings` in the variants file, atomically; the other
    variants' entries are kept as they are, and so are the fields of this one that a run does not record
    (`NOT_RECORDED`: a hand-written `max_concurrency` stays the variant's). True when the entry changed."""
    import yaml

    check_name(name)
    path = Path(path)
    variants = read_variants(path)
    written = variants.get(name, {})
    entry = {}
    for resource in sorted(set(settings) | set(written)):
        if resource not in VARIANT_RESOURCES:
            continue
        fields = {k: v for k, v in (written.get(resource) or {}).items() if k in NOT_RECORDED}
        fields.update((k, v) for k, v in (settings.get(resource) or {}).items() if k not in NOT_RECORDED)
        if fields or resource in settings:
            entry[resource] = dict(sorted(fields.items()))
    if variants.get(name) == entry:
        return False
    variants[name] = entry
    header = ("# ndx-pipeline variants: name -> resource -> field -> value. `ndx-pipeline run --variant NAME` records\n"
              "# the settings it ran with; entries written by hand may name only the fields that differ.\n")
    write_text_atomic(header + yaml.safe_dump(variants, sort_keys=True, allow_unicode=True), path)
    return True


def settings_digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def extraction_key(subject_model: Mapping[str, Any], corpus: Mapping[str, Any], selection: Mapping[str, Any],
                   token_table_counted: bool, revision: Any = None) -> str:
    """What the extraction pass's files depend on: equal keys, equal activation_records and token_table files.
    `revision`: the extraction method's own revision (a new one never shares an older one's files)."""
    model = {k: subject_model.get(k) for k in ("model", "dtype", "window_tokens")}
    chosen = {k: selection.get(k) for k in EXTRACTION_FIELDS}
    if chosen["subject_weights"] in (None, "trained"):  # the default: keys as they were before the setting existed
        del chosen["subject_weights"]
    return settings_digest(model, dict(corpus), chosen, bool(token_table_counted), revision)


# ------------------------------------------------------------------------------------------------------ controls

PLANTED_CONTROL = "planted"  # a control variant's suffix: `<variant>.planted`
RANDOM_WEIGHTS_CONTROL = "random-weights"  # `<variant>.random-weights`: the same, on a re-initialized subject model
CONTROLS = (PLANTED_CONTROL, RANDOM_WEIGHTS_CONTROL)


def control_name(variant: str, control: str = PLANTED_CONTROL) -> str:
    """The name of `variant`'s control variant: `<variant>.<control>` (e.g. `neurons.planted`)."""
    return check_name(f"{variant[:64 - len(control) - 1]}.{control}")


def control_of(name: str) -> str | None:
    """The control a variant's name says it is (`planted`), or None for a variant of its own."""
    for control in CONTROLS:
        if name.endswith(f".{control}"):
            return control
    return None


def planted_settings(settings: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A variant's planted control: its explainer, simulator, scorers and excerpt counts, over planted units (every
    rule) instead of its own units, with no baselines of its own (the planted units' true and wrong explanations
    are what it judges)."""
    out = {resource: dict(fields) for resource, fields in settings.items()}
    out.setdefault("selection", {}).update(units="planted", dictionary=None, dictionary_hook=None, neurons=None,
                                           neurons_per_layer=-1)
    out.setdefault("quality", {}).update(baselines=[])
    return out


def random_weights_settings(settings: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A variant's random-weight control: all of its settings, on the subject model with re-initialized weights
    (same architecture, tokenizer, units and corpus)."""
    out = {resource: dict(fields) for resource, fields in settings.items()}
    out.setdefault("selection", {}).update(subject_weights="random")
    return out
