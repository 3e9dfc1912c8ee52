"""Profile files: where outputs go, the partial files that let an interrupted run resume, and the
formats (no torch).

* The cluster profile is a `ClusterSpec`, written as JSON or YAML by the output's extension.
* The model profile is a `planner.profile_data.ModelProfile`, JSON.
* While a run is under way its measurements so far live next to the output in `<output>.partial.json`
  (raw measurements for `profile cluster`, an incomplete ModelProfile for `profile model`), rewritten
  after every step; a rerun with the same options resumes from it, and it is removed once the output is
  written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from planner.errors import InputError
from planner.outputs import check_new_output

RAW_KIND = "cluster_profile_raw"
RAW_SCHEMA_VERSION = 1
SUFFIXES = (".json", ".yaml", ".yml")


def check_output(path: Path, force: bool, field: str = "--output", suffixes: tuple[str, ...] = SUFFIXES) -> None:
    """Refuse an output that exists (unless `force`), whose directory is missing, or whose extension
    names no format this writer knows."""
    if path.suffix.lower() not in suffixes:
        raise InputError(f"'{path}' must end in {' or '.join(suffixes)}", field=field)
    check_new_output(path, force, field)


def partial_path(output: Path) -> Path:
    """Where the measurements of an unfinished run are kept."""
    return output.with_name(output.name + ".partial.json")


def atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def dump_spec(path: Path, data: dict) -> str:
    """JSON for .json, YAML (block style, keys in schema order) for .yaml / .yml."""
    if path.suffix.lower() == ".json":
        return json.dumps(data, indent=1) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def write_cluster(path: Path, spec) -> None:
    """Write a ClusterSpec where `--cluster` can read it."""
    atomic_write(path, dump_spec(path, spec.model_dump(mode="json")))


def new_raw(config: dict) -> dict:
    """An empty raw cluster profile for `config` (world size, sizes, backend ...)."""
    return {"kind": RAW_KIND, "schema_version": RAW_SCHEMA_VERSION, "config": config, "done": [],
            "devices": {}, "links": {}, "collectives": [], "overlap": []}


def load_raw(path: Path, config: dict, restart: bool) -> tuple[dict, bool]:
    """The partial raw profile at `path` if it was made with the same `config` (resume), else a new one.

    Returns (raw, resumed). A partial file from other options is an error unless `restart` (--force),
    which discards it.
    """
    if not path.exists() or restart:
        return new_raw(config), False
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, RecursionError):
        raise InputError(f"cannot read the partial results '{path}'; delete it or pass --force",
                         field="--output") from None
    if raw.get("kind") != RAW_KIND or raw.get("schema_version") != RAW_SCHEMA_VERSION:
        raise InputError(f"'{path}' is not a partial cluster profile; delete it or pass --force", field="--output")
    if raw.get("config") != config:
        diff = sorted(k for k in set(config) | set(raw.get("config", {}))
                      if config.get(k) != raw.get("config", {}).get(k))
        raise InputError(f"partial results '{path}' were measured with other settings ({', '.join(diff)}); "
                         f"rerun with the same ones to resume, or pass --force to start over", field="--output")
    return raw, True


def save_raw(path: Path, raw: dict) -> None:
    atomic_write(path, json.dumps(raw) + "\n")
