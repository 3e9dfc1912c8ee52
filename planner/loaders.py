"""Turn what the user typed (`--model`, `--cluster`, files) into validated specs, or one clear InputError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from planner.errors import InputError, first_pydantic_error
from planner.hf_config import is_hf_config, model_from_hf_config, validated
from planner.presets import PRESETS
from planner.specs import ClusterSpec, ModelSpec

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster_specs"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml when present: 10x faster


def read_data_file(path: Path, field: str) -> dict[str, Any]:
    """Parse a YAML or JSON file into a mapping."""
    if not path.is_file():
        raise InputError(f"no such file '{path}'", field=field)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read '{path}': {exc.strerror}", field=field) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_YAML_LOADER)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        line = getattr(exc, "lineno", None) or getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + (0 if path.suffix == '.json' else 1)})" if line is not None else ""
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise InputError(f"'{path}' is not valid {kind}{where}", field=field) from None
    if not isinstance(data, dict):
        raise InputError(f"'{path}' must hold a mapping at the top level", field=field)
    return data


def parse_spec(cls: type[BaseModel], data: dict[str, Any], source: str):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise first_pydantic_error(exc, source) from None


def load_versioned(path: str | Path, field: str, cls: type[BaseModel], version: int, kind: str | None = None,
                   what: str = "file"):
    """A JSON/YAML file written by meshplan: checks its `kind` and `schema_version`, then validates it."""
    p = Path(path)
    data = read_data_file(p, field)
    if kind is not None and data.get("kind") != kind:
        raise InputError(f"'{p}' is not a {what}", field=field)
    if data.get("schema_version") != version:
        raise InputError(f"'{p}' has schema_version {data.get('schema_version')!r}; this meshplan reads "
                         f"version {version}", field=field)
    return parse_spec(cls, data, str(p))


def load_model(arg: str) -> ModelSpec:
    """A preset name, a YAML/JSON ModelSpec file, or a Hugging Face config.json file."""
    if arg in PRESETS:
        return PRESETS[arg]
    path = Path(arg)
    if not path.exists():
        raise InputError(f"'{arg}' is neither a preset ({', '.join(PRESETS)}) nor an existing file",
                         field="--model")
    data = read_data_file(path, "--model")
    if is_hf_config(data):
        return validated(model_from_hf_config(data, str(path)), str(path))
    return parse_spec(ModelSpec, data, str(path))


def cluster_names() -> list[str]:
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))


def load_cluster(arg: str, nodes: int | None = None, gpus_per_node: int | None = None) -> ClusterSpec:
    """A name from cluster_specs/ or a YAML/JSON cluster file; `nodes`/`gpus_per_node` override the counts."""
    for bad, name in ((nodes, "--nodes"), (gpus_per_node, "--gpus-per-node")):
        if bad is not None and bad < 1:
            raise InputError(f"must be >= 1 (got {bad})", field=name)
    path = CLUSTER_DIR / f"{arg}.yaml"
    if not path.is_file():
        path = Path(arg)
        if not path.exists():
            raise InputError(f"'{arg}' is neither a built-in cluster ({', '.join(cluster_names())}) "
                             f"nor an existing file", field="--cluster")
    spec = parse_spec(ClusterSpec, read_data_file(path, "--cluster"), str(path))
    return spec.resized(nodes, gpus_per_node)
