"""Exports of a plan to Megatron-LM, DeepSpeed and torchtitan, and the reverse: an existing launch read back.

`export_plan(plan, target)` returns the files and what the target could not express, re-estimated with the
cost model; `read_launch(path, world_size)` recovers a Launch from an export directory, a Megatron-LM or
torchtitan argument list, or a ds_config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from planner.errors import InputError
from planner.export import deepspeed, megatron, torchtitan
from planner.export.common import Adjusted, Launch, plan_engine, read_arg_file, resolved_config
from planner.partition import balanced_layers
from planner.prediction import Prediction

TARGETS = {"megatron": megatron, "deepspeed": deepspeed, "torchtitan": torchtitan}


@dataclass
class Export:
    target: str
    files: dict[str, str]              # file name -> text
    adjusted: Adjusted                 # what was written (the plan's configuration or the nearest one)
    before: Prediction | None          # the plan's configuration, re-estimated (when something changed)
    after: Prediction | None           # the written configuration, re-estimated (when something changed)
    engine_warning: str | None         # the plan was costed for another engine


def cost_model_for(plan, training):
    """The cost model a re-estimate uses: the plan's model, cluster and engine with `training`."""
    from planner.cost.model import CostModel
    return CostModel(plan.model, plan.cluster, training, engine=plan.engine)


def export_plan(plan, target: str) -> Export:
    """Files for `target`; InputError when the target cannot express the plan even approximately."""
    if target not in TARGETS:
        raise InputError(f"'{target}' is not one of {', '.join(TARGETS)}", field="--to")
    module = TARGETS[target]
    adjusted = module.nearest(plan)
    before = after = None
    if adjusted.changes:
        from planner.layout import DEFAULT_ORDER
        original = cost_model_for(plan, plan.training)
        plan_cfg = resolved_config(plan)
        devices = tuple(plan.config.placement) if plan.config.placement is not None else None
        before = original.prediction(original.evaluate_core(plan_cfg, tuple(plan.config.layout or DEFAULT_ORDER),
                                                            devices))
        after = cost_model_for(plan, adjusted.training).evaluate(adjusted.config, adjusted.order)
    engine = plan_engine(plan)
    warning = None if engine == target else (
        f"the plan was costed for the {engine} engine, not {target}: {target} runs it with its own kernels and "
        f"overlaps, so its step time will differ from the plan's")
    return Export(target, module.files(plan, adjusted), adjusted, before, after, warning)


# ---------------------------------------------------------------------------------------------- read back
def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"'{path}' is not valid JSON (line {exc.lineno})", field="--from") from None
    except RecursionError:
        raise InputError(f"'{path}' is nested too deeply", field="--from") from None
    except OSError as exc:
        raise InputError(f"cannot read '{path}': {exc.strerror}", field="--from") from None


def launch_source(path: Path) -> tuple[str, object, Path | None]:
    """(target, its data: an argument list or a ds_config dict, the launch.sh beside it or None)."""
    if not path.exists():
        raise InputError(f"no such file or directory '{path}'", field="--from")
    script = None
    if path.is_dir():
        script = path / "launch.sh" if (path / "launch.sh").is_file() else None
        if (path / "ds_config.json").is_file():
            return "deepspeed", deepspeed.read_file(path / "ds_config.json"), script
        for name in ("args.json", "args.txt"):
            if (path / name).is_file():
                items = read_arg_file(path / name)
                return _which_args(items, path / name), items, script
        raise InputError(f"'{path}' holds no args.json, args.txt or ds_config.json", field="--from")
    if path.suffix == ".json":
        data = _read_json(path)
        if deepspeed.looks_like(data):
            return "deepspeed", data, None
        if isinstance(data, list):
            items = read_arg_file(path)
            return _which_args(items, path), items, None
        raise InputError(f"'{path}' is neither a DeepSpeed config nor a JSON list of arguments", field="--from")
    items = read_arg_file(path)
    return _which_args(items, path), items, None


def _which_args(items: list[str], path: Path) -> str:
    if torchtitan.looks_like(items):
        return "torchtitan"
    if megatron.looks_like(items):
        return "megatron"
    raise InputError(f"'{path}' is neither Megatron-LM arguments (--num-layers ...) nor torchtitan's "
                     f"(--module ...)", field="--from")


def with_model(launch: Launch, model) -> Launch:
    """The launch with its model filled in (DeepSpeed) and an engine's uniform split where it gave none."""
    if launch.routing is not None:
        routing = (model.moe.top_k, model.moe.router) if model.moe is not None else None
        if routing != launch.routing:
            has = "no experts" if routing is None else f"top-{routing[0]}, {routing[1]}"
            raise InputError(f"the launch routes top-{launch.routing[0]} with a {launch.routing[1]} router; "
                             f"{model.name} has {has}", field="--model")
    if launch.config.layers_per_stage is None:
        layers = balanced_layers(model.num_layers, launch.config.pp * launch.config.vpp)
        launch.config = launch.config.model_copy(update={"layers_per_stage": layers})
    launch.model = model
    return launch
