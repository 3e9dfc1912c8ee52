"""The search space: every parallel configuration worth costing, and why the others were dropped."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from planner.parallel_dims import DEFAULT_ORDER, ParallelDims
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec
from planner.validate import divisors, expert_shards, tp_shards

ORDERS: tuple[tuple[str, str, str], ...] = (DEFAULT_ORDER, ("tp", "pp", "dp"))


class Candidate(NamedTuple):
    """A configuration with its rank order; duck-types ParallelConfig for the cost model."""

    tp: int
    pp: int
    dp: int
    vpp: int
    mbs: int
    zero: int
    recompute: str
    sp: bool
    schedule: str
    order: tuple[str, str, str] = DEFAULT_ORDER
    layers_per_stage: tuple[int, ...] | None = None   # explicit blocks per chunk (a compared launch)
    ep: int = 1                                        # expert-parallel degree (inside dp)

    def microbatches(self, global_batch: int) -> int:
        return global_batch // (self.dp * self.mbs)

    @property
    def dims(self) -> ParallelDims:
        """The parallel dimensions with this candidate's rank order."""
        return ParallelDims.of(self, self.order)

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class Constraints:
    """Pinned values (None: search) and limits on the search."""

    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    vpp: int | None = None
    mbs: int | None = None
    zero: int | None = None
    recompute: str | None = None
    sp: bool | None = None
    schedule: str | None = None
    ep: int | None = None
    max_tp: int | None = None
    max_pp: int | None = None
    max_mbs: int | None = None
    max_zero: int = 3
    allow_cross_node_tp: bool = False


def _pick(pin, values):
    return [v for v in values if pin is None or v == pin]


def enumerate_space(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, c: Constraints,
                    rejected: Counter, engine=None) -> Iterator[Candidate]:
    """Every distinct valid candidate the engine (default meshplan) can run. `rejected` counts what was dropped:
    'indivisible' (degree and batch combinations that break a divisibility rule or a limit, or that the engine
    cannot run) and 'dominated' (exact duplicates of another candidate: ZeRO without data parallelism,
    selective recompute without a score matrix to drop, rank orders that place every group identically)."""
    from planner.engine import load_engine
    engine = engine or load_engine()
    gpus, L, B = cluster.world_size, model.num_layers, training.global_batch
    node = cluster.gpus_per_node
    pads = engine.memory_extras.vocab_multiple > 1
    for tp in _pick(c.tp, divisors(gpus)):
        if (tp_shards(model, tp) or (c.max_tp and tp > c.max_tp)
                or (tp > node and not c.allow_cross_node_tp) or (c.sp and tp == 1)
                or (not pads and model.vocab_size % tp) or (tp > 1 and c.sp and not engine.sequence_parallel)):
            rejected["indivisible"] += 1
            continue
        for pp in _pick(c.pp, divisors(gpus // tp)):
            dp = gpus // (tp * pp)
            if pp > L or (c.max_pp and pp > c.max_pp) or (c.dp is not None and dp != c.dp) or B % dp:
                rejected["indivisible"] += 1
                continue
            eps = [e for e in _pick(c.ep, divisors(dp)) if expert_shards(model, e, dp) is None]
            if not eps:
                rejected["indivisible"] += 1
                continue
            for mbs, schedule, vpp, zero, recompute, sp, ep in stage_choices(
                    model, training, engine, c, tp, pp, dp, eps, rejected):
                for order in ORDERS:
                    if order != DEFAULT_ORDER and (pp == 1 or dp == 1):
                        rejected["dominated"] += 1   # both orders place every group alike
                        continue
                    yield Candidate(tp, pp, dp, vpp, mbs, zero, recompute, sp, schedule, order, ep=ep)


def stage_choices(model: ModelSpec, training: TrainingSpec, engine, c: Constraints, tp: int, pp: int, dp: int,
                  eps: list[int], rejected: Counter) -> Iterator[tuple[int, str, int, int, str, bool, int]]:
    """(mbs, schedule, vpp, zero, recompute, sp, ep) choices valid for given tp, pp and dp degrees, shared by the
    homogeneous and the node-group searches; `rejected` counts what was dropped (see enumerate_space)."""
    L, B = model.num_layers, training.global_batch
    selective_is_none = (engine.recompute.selective == "attention_core"
                         and (model.attention_kernel or engine.kernels.attention) == "flash")
    moe = model.moe is not None
    for mbs in _pick(c.mbs, divisors(B // dp)):
        if c.max_mbs and mbs > c.max_mbs:
            rejected["indivisible"] += 1
            continue
        m = B // (dp * mbs)
        for schedule, vpp in _schedules(pp, m, L, c, rejected, engine.schedules):
            top = min(c.max_zero, engine.pipeline_max_zero if pp > 1 else 3)
            for zero in _pick(c.zero, [z for z in engine.zero_stages if z <= top]):
                if dp == 1 and zero > 0 and c.zero is None:
                    rejected["dominated"] += 1
                    continue
                for recompute in _pick(c.recompute, engine.recompute_modes):
                    if recompute == "selective" and selective_is_none and c.recompute is None:
                        rejected["dominated"] += 1
                        continue
                    sps = (False, True) if tp > 1 and engine.sequence_parallel else (False,)
                    for sp in _pick(c.sp, sps):
                        if (sp and training.seq_len % tp) or (moe and tp > 1 and not sp):
                            rejected["indivisible"] += 1
                            continue
                        for ep in eps:
                            yield mbs, schedule, vpp, zero, recompute, sp, ep


def _schedules(pp: int, m: int, L: int, c: Constraints, rejected: Counter,
               allowed: list[str]) -> list[tuple[str, int]]:
    """(schedule, vpp) pairs for a pipeline of pp stages and m micro-batches that the engine runs."""
    if pp == 1:
        if c.schedule in (None, "1f1b") and c.vpp in (None, 1):
            return [("1f1b", 1)]
        rejected["indivisible"] += 1
        return []
    # torch.distributed.pipelining's 1F1B needs m >= pp; with fewer micro-batches it is GPipe anyway
    out = [(s, 1) for s in _pick(c.schedule, [x for x in ("gpipe", "1f1b") if x in allowed])
           if c.vpp in (None, 1) and (s == "gpipe" or m >= pp)]
    if c.schedule in (None, "interleaved") and "interleaved" in allowed and m % pp == 0:
        if c.vpp is not None:
            out += [("interleaved", c.vpp)] if 2 <= c.vpp <= L // pp else []
        elif L % pp == 0:
            # equal chunks, as Megatron-LM requires (layers per stage divisible by layers per virtual stage):
            # a number of choices that grows with the divisors of L / pp, not with L
            out += [("interleaved", v) for v in divisors(L // pp) if v >= 2]
    return out
