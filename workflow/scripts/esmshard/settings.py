"""The workflow's configuration as users give it. Standard library and PyYAML only (both come
with Snakemake): the Snakefile uses this while it is parsed."""

import functools
import json
import sys

import yaml

from esmshard.paths import WORKFLOW_DIR

# The one source of the options, their meanings and defaults (config/config.yaml comments them).
SCHEMA = WORKFLOW_DIR / "schemas" / "config.schema.yaml"

_YAML_TYPES = {"integer": int, "number": (int, float), "boolean": bool, "null": type(None), "array": list}


def read_command_line_values(config: dict) -> None:
    """Give values from ``--config`` their YAML types where the schema wants them: Snakemake
    leaves the items of ``layers=[-1,20]`` and the words ``null``, ``true`` and ``false`` as
    strings. Changes ``config`` in place; the schema check comes after."""
    properties = schema()["properties"]
    for key, value in config.items():
        spec = properties.get(key, {})
        if isinstance(value, list) and spec.get("items", {}).get("type") not in (None, "string"):
            config[key] = [_as_yaml(item, spec["items"]) for item in value]
        else:
            config[key] = _as_yaml(value, spec)


def _as_yaml(value, spec: dict):
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    types = spec.get("type", [])
    types = [types] if isinstance(types, str) else types
    wanted = tuple(_YAML_TYPES[t] for t in types if t in _YAML_TYPES)
    if isinstance(parsed, str) or not wanted or not isinstance(parsed, wanted):
        return value
    return parsed


@functools.cache
def schema() -> dict:
    # libyaml's safe loader where PyYAML has it: 1 ms instead of 15 in every job that reads the
    # schema (snakemake's parse, plan, rank, aggregate), the same values
    with open(SCHEMA) as handle:
        return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def options_table() -> str:
    """Every option, its default and its meaning, from the schema, as the Markdown table that
    config/README.md shows (``python -m esmshard options`` prints it)."""
    rows = ["| option | default | what it is |", "|---|---|---|"]
    for key, spec in schema()["properties"].items():
        default = "required" if key in schema().get("required", []) else f"`{json.dumps(spec.get('default'))}`"
        meaning = " ".join(spec["description"].split()).replace("|", r"\|")
        if "enum" in spec or "enum" in spec.get("items", {}):
            values = ", ".join(
                f"`{json.dumps(value).strip(chr(34))}`" for value in spec.get("enum", spec.get("items", {}).get("enum"))
            )
            meaning += f" ({'any' if 'items' in spec else 'one'} of {values})"
        rows.append(f"| `{key}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


# Options that are no longer, and what a config that sets one should do instead.
RETIRED = {
    "compile": "delete it: esmshard's own GPU kernels run as fast as torch.compile's, with no compiling",
    "per_residue_in_embeddings": "delete it: embeddings.h5 always holds its own copy of the per-residue rows",
    "chunk_sequences": "it is now segment_sequences",
    "chunk_seconds": "it is now segment_seconds",
}


def workflow_config(config: dict) -> dict:
    """The config the workflow runs with: values from ``--config`` in their YAML types, the
    schema's defaults for options not given, checked. Raises ValueError naming each bad option,
    its value and what is allowed, in one line."""
    retired = [f"{name} is no longer an option: {RETIRED[name]}" for name in config if name in RETIRED]
    if retired:
        raise ValueError(f"config: {'; '.join(retired)}")
    config = dict(config)
    read_command_line_values(config)
    return checked({**defaults(), **config})


def stop(error) -> None:
    """End the workflow while it is parsed, for a user's error: its one line, no traceback
    (Snakemake prints one, with the rule files' frames, for any exception raised there)."""
    print(f"esmshard: ERROR: {error}", file=sys.stderr)
    raise SystemExit(1)


def defaults() -> dict:
    """Every option's default, from the schema."""
    return {key: spec["default"] for key, spec in schema()["properties"].items() if "default" in spec}


def checked(config: dict, partial: bool = False) -> dict:
    """``config`` with any sequence given for a list option (a tuple, a numpy array) as a list of
    plain values, as YAML and the schema take them, checked against the schema (``partial``: the
    options given may be a few, ``fasta`` among them or not). Raises ValueError naming every
    bad option and value."""
    import jsonschema  # Snakemake's own dependency; parsing the workflow does not need it

    lists = {name for name, option in schema()["properties"].items() if option.get("type") == "array"}
    config = {name: _plain_list(value) if name in lists else value for name, value in config.items()}
    rules = {key: value for key, value in schema().items() if not (partial and key == "required")}
    validator = jsonschema.validators.validator_for(rules)(rules)
    errors = [
        ": ".join(filter(None, ["/".join(map(str, e.absolute_path)), e.message])) for e in validator.iter_errors(config)
    ]
    if errors:
        raise ValueError(f"config: {'; '.join(errors)}")
    return config


def _plain_list(value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value  # the schema names what is wrong with it
    return [item.item() if hasattr(item, "item") else item for item in value]
