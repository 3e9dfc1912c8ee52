"""Turn what the user typed (`--model`, `--cluster`, files) into validated specs, or one clear InputError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from planner.errors import InputError, first_pydantic_error
from planner.hf_config import is_hf_config, model_from_hf_config, validated
from planner.limits import check_option, check_spec, check_world
from planner.presets import PRESETS
from planner.specs import ClusterSpec, ModelSpec

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster_specs"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml when present: 10x faster
MAX_FILE_BYTES = 256 * 2 ** 20     # a profiled 1,024-GPU cluster file (two 1024 x 1024 link matrices) is ~40 MB


def is_file(path: Path) -> bool:
    """Whether `path` names a regular file; False for names the OS cannot even look up (too long, ...)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def read_data_file(path: Path, field: str) -> dict[str, Any]:
    """Parse a YAML or JSON file into a mapping."""
    if not is_file(path):
        raise InputError(f"no such file '{path}'", field=field)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise InputError(f"'{path}' is larger than {MAX_FILE_BYTES // 2 ** 20} MiB", field=field)
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read '{path}': {exc.strerror}", field=field) from None
    except UnicodeDecodeError:
        raise InputError(f"'{path}' is not a UTF-8 text file", field=field) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_YAML_LOADER)
    except RecursionError:
        raise InputError(f"'{path}' is nested too deeply", field=field) from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        line = getattr(exc, "lineno", None) or getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + (0 if path.suffix == '.json' else 1)})" if line is not None else ""
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise InputError(f"'{path}' is not valid {kind}{where}", field=field) from None
    if not isinstance(data, dict):
        raise InputError(f"'{path}' must hold a mapping at the top level", field=field)
    return data


def parse_spec(cls: type[BaseModel], data: dict[str, Any], source: str):
    """`data` validated as `cls`, every number within its range (planner.limits); else one InputError."""
    try:
        spec = cls.model_validate(data)
    except ValidationError as exc:
        raise first_pydantic_error(exc, source) from None
    except RecursionError:
        raise InputError("nested too deeply", field=source) from None
    check_spec(spec, source)
    return spec


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
    if not exists(path):
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
    check_option(nodes, "--nodes")
    check_option(gpus_per_node, "--gpus-per-node")
    path = CLUSTER_DIR / f"{arg}.yaml"
    if "/" in arg or not is_file(path):
        path = Path(arg)
        if not exists(path):
            raise InputError(f"'{arg}' is neither a built-in cluster ({', '.join(cluster_names())}) "
                             f"nor an existing file", field="--cluster")
    spec = parse_spec(ClusterSpec, read_data_file(path, "--cluster"), str(path))
    resized = spec.resized(nodes, gpus_per_node)
    if nodes is not None or gpus_per_node is not None:
        check_world(resized.num_nodes, resized.gpus_per_node, "--nodes" if nodes else "--gpus-per-node")
    return resized
