"""Fuzzing the meshplan CLI: mutations of valid commands (odd numbers, bad choices, broken or hostile files,
unwritable outputs, dropped and unknown options), run in-process through `planner.cli.main` under a time
limit. Every answer must be exit 0, 2 or 3 within the limit, with no traceback, and exactly one line on
stderr for exit 2. Used by tests/test_cli_fuzz.py (a few hundred cases) and scripts/fuzz_cli.py (thousands).

Nothing here launches a process or measures anything: `meshplan run` cases carry --print-command, and
`meshplan profile` cases always carry a value outside its documented range (so they must exit 2 before
any measurement starts).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from planner.cost.model import CostModel
from planner.limits import OPTIONS
from planner.loaders import load_cluster
from planner.plan import make_plan
from planner.presets import PRESETS
from planner.specs import ParallelConfig, TrainingSpec

TIME_LIMIT_S = 30.0          # per case; the slowest valid cases take a few seconds on a loaded 2-core machine


class CaseTimeout(BaseException):
    """Raised by the alarm inside a case that ran past its limit."""


@dataclass
class Outcome:
    argv: list[str]
    code: int | None           # None: it raised (see `error`) or timed out
    out: str
    err: str
    seconds: float
    error: str = ""            # the uncaught exception, or "timeout"

    def problems(self, must_fail: bool = False) -> list[str]:
        """What is wrong with this answer (empty when it is a good one)."""
        bad = []
        if self.error:
            bad.append(self.error)
        elif self.code not in (0, 2, 3):
            bad.append(f"exit code {self.code}")
        if "Traceback" in self.err or "Traceback" in self.out:
            bad.append("traceback in the output")
        if self.code == 2 and len([x for x in self.err.splitlines() if x.strip()]) != 1:
            bad.append(f"exit 2 with {len(self.err.splitlines())} lines on stderr")
        if must_fail and self.code not in (2, None):
            bad.append(f"a value outside its documented range was accepted (exit {self.code})")
        return bad


def run_case(argv: list[str], time_limit_s: float = TIME_LIMIT_S) -> Outcome:
    """`meshplan ARGV` in this process, its stdout and stderr captured, stopped by SIGALRM at the limit."""
    from planner.cli import main

    def alarm(signum, frame):
        raise CaseTimeout()

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, time_limit_s)
    start = time.perf_counter()
    code, error = None, ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except CaseTimeout:
        error = f"no answer within {time_limit_s:.0f} s"
    except Exception as exc:     # noqa: BLE001  (any uncaught exception is a finding)
        error = f"uncaught {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return Outcome(argv, code, out.getvalue(), err.getvalue(), time.perf_counter() - start, error)


# ----------------------------------------------------------------------------------------------
# The files cases point at
# ----------------------------------------------------------------------------------------------
@dataclass
class Files:
    root: Path
    plan: Path                       # a valid 2-process plan of gpt-tiny on cpu-local
    model: Path                      # valid model and cluster files, YAML
    cluster: Path
    hostile: list[str]               # paths of broken, hostile or odd input files
    unwritable: list[str]            # outputs that cannot be written (or must not be overwritten)
    documents: dict[str, object]     # the valid plan, model and cluster as JSON data, for structural mutations


def _deep_yaml(depth: int) -> str:
    return "".join(f"{'  ' * i}k{i}:\n" for i in range(depth)) + f"{'  ' * depth}x: 1\n"


def _bomb_yaml(levels: int = 9) -> str:
    """The 'billion laughs': each level lists the previous one ten times."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "\n".join(lines) + f"\nnum_layers: *a{levels - 1}\n"


def make_files(root: Path) -> Files:
    """Write every file the cases use under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    spec = PRESETS["gpt-tiny"]
    cluster = load_cluster("cpu-local", nodes=1, gpus_per_node=2)
    training = TrainingSpec(global_batch=8, seq_len=64, precision="fp32")
    plan = make_plan(spec, cluster, training, CostModel(spec, cluster, training).evaluate(ParallelConfig(tp=2)))
    plan_text = plan.model_dump_json(indent=1)
    (root / "plan.json").write_text(plan_text)
    model_data = spec.model_dump(mode="json")
    cluster_data = load_cluster("dgx-a100-80gb").model_dump(mode="json")
    (root / "model.yaml").write_text(json.dumps(model_data))
    (root / "cluster.json").write_text(json.dumps(cluster_data))

    files: dict[str, str | bytes] = {
        "empty.yaml": "", "empty.json": "", "list.json": "[1, 2, 3]", "scalar.yaml": "42\n", "null.json": "null",
        "garbage.yaml": bytes(range(256)) * 4, "garbage.json": b"\xff\xfe\x00{\x80\x81",
        "deep.json": "[" * 100_000, "deep-object.json": '{"a":' * 50_000 + "1" + "}" * 50_000,
        "deep.yaml": _deep_yaml(3_000), "bomb.yaml": _bomb_yaml(), "tabs.yaml": "num_layers:\t\t[\n",
        "truncated-plan.json": plan_text[: len(plan_text) // 2],
        "plan-version-0.json": json.dumps({**json.loads(plan_text), "schema_version": 0}),
        "plan-tp3.json": json.dumps({**json.loads(plan_text),
                                     "config": {**json.loads(plan_text)["config"], "tp": 3}}),
        "plan-no-layout.json": json.dumps({**json.loads(plan_text), "rank_layout": []}),
        "plan-huge-model.json": json.dumps({**json.loads(plan_text),
                                            "model": {**model_data, "hidden_size": 10 ** 30}}),
        "model-huge.yaml": json.dumps({**model_data, "num_layers": 10 ** 6, "vocab_size": 2 ** 64}),
        "model-1e400.yaml": "num_layers: 4\nhidden_size: 64\nnum_heads: 4\nvocab_size: 1.0e+400\n",
        "model-types.yaml": json.dumps({**model_data, "hidden_size": "sixty-four", "name": {"a": 1}}),
        "model-null.yaml": json.dumps({**model_data, "num_heads": None}),
        "model-odd-rope.yaml": json.dumps({**model_data, "hidden_size": 66, "num_heads": 6,
                                           "position_embedding": "rope"}),
        "hf-bad.json": json.dumps({"n_layer": "x", "n_embd": 64, "n_head": 4, "vocab_size": 50257,
                                   "activation_function": ["gelu"], "resid_pdrop": "abc"}),
        "hf-llama-bad.json": json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                         "intermediate_size": 128, "vocab_size": 10 ** 12, "hidden_act": "relu"}),
        "cluster-zero-memory.json": json.dumps(_with(cluster_data, "memory_bytes", 0)),
        "cluster-inf-flops.json": json.dumps(_with(cluster_data, "peak_flops", {"fp32": 1e300, "bf16": 1e300})),
        "cluster-tiny-flops.json": json.dumps(_with(cluster_data, "peak_flops", {"fp32": 1e-300})),
        "cluster-huge-nodes.json": json.dumps({**cluster_data, "nodes": {**cluster_data["nodes"],
                                                                         "count": 10 ** 9}}),
        "cluster-bad-matrix.json": json.dumps({**cluster_data, "link_matrix": {
            "world_size": 8, "bandwidth": [[1.0]], "latency": [[0.0]]}}),
        "cluster-negative-latency.json": json.dumps({**cluster_data, "intra_node": {
            **cluster_data["intra_node"], "latency": -1.0}}),
        "compare-list.json": '{"config": [1, 2]}', "compare-layout.json": '{"config": {"layout": 5, "tp": 1}}',
        "compare-mixed-layout.json": '{"layout": [1, "tp", "dp"]}', "compare-tp-text.json": '{"tp": "x"}',
        "tokens-empty.bin": b"", "tokens-odd.bin": b"\x01\x02\x03",
        "tokens-wide.bin": bytes(4096), "tokens-big-ids.bin": b"\xff\xff" * 4096,
        "[bold]markup.yaml": "num_layers: [/bold]\n",
    }
    hostile = []
    for name, content in files.items():
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        hostile.append(str(path))
    (root / "a-directory").mkdir(exist_ok=True)
    loop = root / "loop.yaml"
    if not loop.is_symlink():
        os.symlink(loop, loop)
    hostile += [str(root / "a-directory"), str(loop), str(root / "missing.yaml"), "/dev/null", "/dev/zero",
                "/proc/self/status", str(root / ("x" * 5000)), "[bold]not-a-preset", "gpt-tiny\n", ""]
    (root / "exists.json").write_text("{}")
    unwritable = [str(root / "no-such-dir" / "out.json"), str(root / "a-directory"), "/proc/version",
                  "/proc/no-such-dir/out.json", "/dev/null", str(root / "exists.json"), str(root / ("y" * 5000)),
                  "", "/sys/out.json"]
    documents = {"plan": json.loads(plan_text), "model": model_data, "cluster": cluster_data}
    return Files(root, root / "plan.json", root / "model.yaml", root / "cluster.json", hostile, unwritable, documents)


def _with(cluster: dict, key: str, value) -> dict:
    """The cluster with one field of its GPU type changed."""
    gpu_type = cluster["nodes"]["gpu_type"]
    return {**cluster, "gpu_types": {gpu_type: {**cluster["gpu_types"][gpu_type], key: value}}}


# ----------------------------------------------------------------------------------------------
# Commands and their mutations
# ----------------------------------------------------------------------------------------------
ODD_NUMBERS = ["0", "-1", "1", "2", "3", "5", "7", "12", "97", "127", "1023", "1024", "4096", "65535", "65536",
               "65537", "262144", "262145", "720720", "997920", "1048576", "1048577", str(2 ** 31), str(2 ** 32),
               str(2 ** 63), str(2 ** 64 + 1), "99999999999999999999", "9" * 400, "9" * 5000, "1e3", "1.5",
               "0.5", "0.9", "0.95", "-0.0", "nan", "inf", "-inf", "1e-300", "1e308", "0x10", "", " ", "1_000",
               "\u0663", "+3", "007", "2,3", "tp"]
BAD_CHOICES = ["", "x", "BF16", "fp8", "none,full", "1f1b ", "interleaved\n", "[bold]", "7", "-1"]

ESTIMATE_NUMBERS = ["--nodes", "--gpus-per-node", "--global-batch", "--seq", "--tp", "--pp", "--dp", "--mbs",
                    "--vpp", "--zero", "--layers-per-stage", "--memory-headroom"]
PLAN_NUMBERS = ["--nodes", "--gpus-per-node", "--global-batch", "--seq", "--tp", "--pp", "--dp", "--mbs", "--vpp",
                "--zero", "--max-tp", "--max-pp", "--max-mbs", "--top", "--memory-headroom"]
RUN_NUMBERS = ["--steps", "--seed", "--lr", "--checkpoint-every", "--nnodes", "--node-rank", "--nproc-per-node"]
PROFILE_MODEL_NUMBERS = ["--seq", "--reps", "--warmup", "--timeout", "--threads", "--tp", "--mbs"]
PROFILE_CLUSTER_NUMBERS = ["--nproc", "--reps", "--timeout", "--collective-timeout", "--p2p-sizes",
                           "--collective-sizes"]
CHOICES = {"estimate": ["--precision", "--optimizer", "--recompute", "--schedule"],
           "plan": ["--precision", "--optimizer", "--recompute", "--schedule"],
           "run": ["--data-dtype"], "profile model": ["--precision", "--optimizer", "--recompute"]}
INPUTS = {"estimate": ["--model", "--cluster", "--profile"], "plan": ["--model", "--cluster", "--profile", "--compare"],
          "run": ["PLAN", "--data"], "profile model": ["--model"]}
OUTPUTS = {"estimate": ["--output"], "plan": ["--output"], "run": ["--report", "--checkpoint-dir"],
           "profile model": ["--output"], "profile cluster": ["--output", "--raw"]}
FLAGS = {"estimate": ["--json", "--force", "--sp", "--no-sp", "--no-overlap-grad-reduce"],
         "plan": ["--json", "--force", "--sp", "--no-sp", "--no-zero3", "--allow-cross-node-tp"],
         "run": ["--force", "--resume"], "profile model": ["--force"], "profile cluster": ["--force"]}


def _outside(field: str) -> list[str]:
    """Values certainly outside the documented range of `field`."""
    r = OPTIONS[field]
    lo, hi = r.lo, r.hi
    below = [str(int(lo) - 1) if float(lo).is_integer() else str(lo / 2 - 1e-3)]
    return below + [str(int(hi) + 1) if float(hi).is_integer() else str(hi * 2 + 1), "nan", "-5", "abc",
                    "99999999999999999999"]


def base_commands(files: Files) -> dict[str, list[str]]:
    """One valid command of each kind (profile commands are valid but for the value a case makes invalid)."""
    out = str(files.root / "out")
    return {
        "estimate": ["estimate", "--model", "gpt-tiny", "--cluster", "cpu-local", "--global-batch", "8", "--seq", "64",
                     "--tp", "2", "--pp", "2", "--dp", "2", "--precision", "fp32"],
        "estimate-big": ["estimate", "--model", "gpt3-1.3b", "--cluster", "dgx-a100-80gb", "--nodes", "2",
                         "--global-batch", "64", "--tp", "2", "--pp", "2", "--mbs", "2"],
        "plan": ["plan", "--model", "gpt3-1.3b", "--cluster", "dgx-a100-80gb", "--nodes", "2", "--global-batch", "64",
                 "--top", "3"],
        "plan-files": ["plan", "--model", str(files.model), "--cluster", str(files.cluster), "--global-batch", "16",
                       "--seq", "128", "--json"],
        "plan-llama": ["plan", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1", "--global-batch", "32",
                       "--seq", "4096", "--compare", "tp=8,pp=1"],
        "run": ["run", str(files.plan), "--print-command", "--steps", "3", "--seed", "1"],
        "profile model": ["profile", "model", "--model", "gpt-tiny", "--output", f"{out}-profile.json", "--tp", "1",
                          "--mbs", "1", "--seq", "64", "--reps", "1", "--warmup", "0", "--no-progress"],
        "profile cluster": ["profile", "cluster", "--nproc", "2", "--output", f"{out}-cluster.json", "--reps", "1",
                            "--no-progress"],
        "schema": ["schema", "plan"],
        "presets": ["presets"],
    }


JSON_VALUES = [None, "x", "", -1, 0, 1, 3, 10 ** 30, 1e308, -1e308, 0.5, True, False, [], {}, [1, 2], {"a": 1},
               "nan", "[bold]x[/]", "9" * 50, [[1.0]], {"fp32": 0}]


def _mutated(draw, doc):
    """`doc` with one value somewhere inside it replaced by an odd JSON value, or one key removed."""
    if isinstance(doc, dict) and doc and draw(st.integers(0, 5)):
        key = draw(st.sampled_from(sorted(doc)))
        out = dict(doc)
        if not draw(st.integers(0, 7)):
            del out[key]
        else:
            out[key] = _mutated(draw, doc[key])
        return out
    if isinstance(doc, list) and doc and draw(st.integers(0, 5)):
        i = draw(st.integers(0, len(doc) - 1))
        return doc[:i] + [_mutated(draw, doc[i])] + doc[i + 1:]
    return draw(st.sampled_from(JSON_VALUES))


def _mutated_file(draw, files: Files, which: str) -> str:
    """A structurally mutated copy of the valid plan, model or cluster file, written under files.root."""
    import hashlib
    text = json.dumps(_mutated(draw, files.documents[which]))
    path = files.root / f"mutated-{which}-{hashlib.sha1(text.encode()).hexdigest()[:16]}.json"
    path.write_text(text)
    return str(path)


MUTATED = {"estimate": {"--model": "model", "--cluster": "cluster"},
           "plan": {"--model": "model", "--cluster": "cluster", "--compare": "plan"},
           "run": {"PLAN": "plan"}, "profile model": {"--model": "model"}}


def _kind(name: str) -> str:
    return name.split("-")[0] if not name.startswith("profile") else name


def _set(argv: list[str], option: str, value: str) -> list[str]:
    """argv with `option` set to `value` (replaced where present, else appended)."""
    if option == "PLAN":
        return [argv[0], value, *argv[2:]]
    out = list(argv)
    if option in out:
        i = out.index(option)
        if i + 1 < len(out):
            out[i + 1] = value
            return out
    return out + [option, value]


def _drop(argv: list[str], option: str) -> list[str]:
    if option not in argv:
        return argv
    i = argv.index(option)
    has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
    return argv[:i] + argv[i + 1 + has_value:]


@st.composite
def cases(draw, files: Files) -> tuple[list[str], bool]:
    """(argv, must_fail): a valid command with up to four mutations; must_fail when a value outside its
    documented range was put in (profile commands always get one, so that nothing is measured)."""
    bases = base_commands(files)
    name = draw(st.sampled_from(sorted(bases)))
    argv, kind = list(bases[name]), _kind(name)
    numbers = {"estimate": ESTIMATE_NUMBERS, "plan": PLAN_NUMBERS, "run": RUN_NUMBERS,
               "profile model": PROFILE_MODEL_NUMBERS, "profile cluster": PROFILE_CLUSTER_NUMBERS}.get(kind, [])
    kinds = ["number"] * 4 + ["choice", "input", "mutated", "mutated", "output", "flag", "drop", "unknown",
                              "compare"]
    for _ in range(draw(st.integers(0, 4))):
        what = draw(st.sampled_from(kinds))
        if what == "number" and numbers:
            field = draw(st.sampled_from(numbers))
            value = draw(st.one_of(st.sampled_from(ODD_NUMBERS), st.integers(-3, 3000).map(str),
                                   st.integers(1, 2 ** 40).map(str), st.floats(allow_nan=True).map(repr)))
            if field in ("--layers-per-stage",) and draw(st.booleans()):
                value = ",".join(draw(st.lists(st.sampled_from(ODD_NUMBERS[:20]), min_size=1, max_size=6)))
            argv = _set(argv, field, value)
        elif what == "choice" and kind in CHOICES:
            argv = _set(argv, draw(st.sampled_from(CHOICES[kind])), draw(st.sampled_from(BAD_CHOICES)))
        elif what == "choice" and kind == "schema":
            argv = ["schema", draw(st.sampled_from(BAD_CHOICES))]
        elif what == "input" and kind in INPUTS:
            argv = _set(argv, draw(st.sampled_from(INPUTS[kind])), draw(st.sampled_from(files.hostile)))
        elif what == "mutated" and kind in MUTATED:
            option = draw(st.sampled_from(sorted(MUTATED[kind])))
            argv = _set(argv, option, _mutated_file(draw, files, MUTATED[kind][option]))
        elif what == "output" and kind in OUTPUTS:
            option = draw(st.sampled_from(OUTPUTS[kind]))
            argv = _set(argv, option, draw(st.sampled_from(files.unwritable)))
            if option == "--checkpoint-dir":
                argv = _set(argv, "--checkpoint-every", "1")
        elif what == "flag" and kind in FLAGS:
            argv = argv + [draw(st.sampled_from(FLAGS[kind]))]
        elif what == "drop" and len(argv) > 2:
            option = draw(st.sampled_from([a for a in argv if a.startswith("--")] or ["--none"]))
            if option not in ("--print-command", "--nproc") and not (kind.startswith("profile") and option in numbers):
                argv = _drop(argv, option)
        elif what == "unknown":
            argv = argv + [draw(st.sampled_from(["--bogus", "-x", "stray", "--", "--tp=2", "-k"]))]
        elif what == "compare" and kind == "plan":
            pairs = draw(st.lists(st.tuples(st.sampled_from(["tp", "pp", "dp", "mbs", "vpp", "zero", "sp", "bogus",
                                                             "schedule", "recompute", ""]),
                                            st.sampled_from(ODD_NUMBERS[:30] + ["full", "1f1b", "true"])),
                                  max_size=5))
            argv = _set(argv, "--compare", ",".join(f"{k}={v}" for k, v in pairs))
    must_fail = kind.startswith("profile")
    if must_fail:           # last, so that no other mutation puts a valid value back
        field = draw(st.sampled_from(numbers))
        argv = [a for a in argv if not a.startswith(field + "=")]     # a later --tp=2 would win (click: last)
        argv = _set(argv, field, draw(st.sampled_from(_outside(field))))
    return argv, must_fail
