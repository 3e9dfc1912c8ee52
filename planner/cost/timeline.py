"""Memory over one training step on one GPU of a pipeline stage: the peak is the largest of the phase
peaks, not the sum of every maximum (DESIGN.md Sec. 9).

Phases: the forward (activations of the in-flight micro-batches at their largest count; gradients already
exist when a backward came before, as in 1F1B's steady state or the second micro-batch of gradient
accumulation), the backward (the same activations with the gradients growing as they are freed, a block's
backward working set, FSDP's unsharded parameters and gradients) and the optimizer step (states, reduced
gradients and the optimizer's temporaries, no activations). Which model states exist when follows the
engine's memory recipe (planner/engine.py): persistent gradient buffers (Megatron, DeepSpeed) or gradients
created by the backward and freed by zero_grad (PyTorch); ZeRO sharding; FSDP's gathered 16-bit copies,
resharded after forward or kept; gradients accumulated unsharded when their reduction waits for the last
micro-batch (torch.distributed.pipelining, ZeRO-1). Bytes throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.memory import StateBytes, state_bytes

PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class StageInputs:
    """What one GPU of a pipeline stage holds, from the cost model."""

    params: float             # local parameters (elements) of the stage on this TP rank
    block_params: float       # parameters of one block on this TP rank
    end_params: float         # embedding / head / final-norm parameters on this stage
    last_params: float        # parameters whose gradients come last in the backward (stage 0's embedding)
    whole_grad_params: float  # parameters more whose gradients are kept unsharded beside `params`
    acts_held: float          # activations of the micro-batches in flight at the stage's peak
    acts_one: float           # activations of one micro-batch on this stage
    head_acts: float          # of which the loss's (last stage; 0 elsewhere)
    held: int                 # micro-batches in flight at the peak
    microbatches: int
    block_transient: float    # a block's backward working set
    head_transient: float     # logits in flight in the forward (last stage; 0 elsewhere)
    head_backward: float      # the loss's backward buffers (last stage; 0 elsewhere)
    autocast_copies: float    # 16-bit weight copies autocast keeps for the whole step (0 if none)
    pipeline_buffers: float   # pipeline receive buffers (kept all step)
    inflight_outputs: float   # stage outputs kept for the in-flight micro-batches' backwards


@dataclass(frozen=True)
class PhaseMemory:
    """Bytes by kind at one phase's peak."""

    params: float
    grads: float
    optimizer: float
    activations: float
    other: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.other


@dataclass(frozen=True)
class Timeline:
    phases: dict[str, PhaseMemory]

    @property
    def peak_phase(self) -> str:
        totals = [self.phases[p].total for p in PHASES]
        return PHASES[totals.index(max(totals))]

    @property
    def peak(self) -> PhaseMemory:
        return self.phases[self.peak_phase]


@dataclass(frozen=True)
class Regime:
    """The engine facts that decide which states exist when (hashable, for caches)."""

    zero: int
    dp: int
    pp: int
    optimizer: str
    reshard_after_forward: bool   # engine.overlap.reshard_after_forward
    prefetch: bool                # engine.overlap.zero3_prefetch
    defer_under_pipeline: bool    # engine.overlap.grad_sync_under_pipeline == "last_microbatch"
    microbatches: int

    @property
    def sync_every_microbatch(self) -> bool:
        """Gradients reduce-scattered in each micro-batch's backward (ZeRO-2/3, or a single micro-batch) rather
        than accumulated unsharded until the last one."""
        return self.microbatches == 1 or (self.zero >= 2 and (self.pp == 1 or not self.defer_under_pipeline))


def grads_between_bytes(recipe, regime: Regime) -> float:
    """Bytes per parameter of the gradients held between two backwards of a step: the persistent buffer, the
    unsharded ones accumulated while their reduction waits for the last micro-batch, or the reduced shards."""
    reduced = state_bytes(recipe, regime.optimizer, regime.zero, regime.dp).grads
    if recipe.grads_held_between_steps:
        return reduced
    sharded = regime.dp > 1 and regime.zero >= recipe.grads.sharded_from
    if sharded and not regime.sync_every_microbatch:
        return recipe.accumulated_grads_bytes or recipe.grads.bytes
    return reduced


def stage_timeline(recipe, regime: Regime, s: StageInputs, sb: StateBytes | None = None,
                   between: float | None = None) -> Timeline:
    """Phase peaks of one stage under a memory recipe (planner.engine.MemoryRecipe). `sb` and `between`
    (state_bytes and grads_between_bytes of the recipe and regime) may be passed in precomputed."""
    sb = sb or state_bytes(recipe, regime.optimizer, regime.zero, regime.dp)
    weights, opt_states = s.params * sb.weights, s.params * sb.optimizer
    grad_params = s.params + s.whole_grad_params
    reduced = grad_params * sb.grads
    grads_between = grad_params * (grads_between_bytes(recipe, regime) if between is None else between)

    # unsharded parameter copies: between blocks (at the loss, at the embedding) and inside a block's backward
    fsdp = recipe.gathered_weights_bytes > 0 and regime.dp > 1 and regime.zero >= recipe.weights.sharded_from
    between_blocks = in_block = 0.0
    if fsdp:
        root = s.end_params * recipe.gathered_weights_bytes          # the root module is never resharded
        resharded = (regime.zero >= 3 and regime.reshard_after_forward
                     and not (regime.pp > 1 and regime.defer_under_pipeline))
        if resharded:      # a block is gathered for its forward and again for its backward, then freed
            between_blocks = root
            in_block = root + (2 if regime.prefetch else 1) * s.block_params * recipe.gathered_weights_bytes
        else:              # gathered at the first forward and kept until the backward is done
            between_blocks = in_block = s.params * recipe.gathered_weights_bytes
    if regime.zero == 0 and regime.dp > 1:   # a replicate wrapper's unsharded copy (FSDP2's replicate)
        between_blocks = in_block = s.params * recipe.replicate_copy_bytes
    reduce_buffer = (s.block_params * recipe.gathered_grads_bytes
                     if fsdp and regime.sync_every_microbatch else 0.0)

    steady = s.microbatches > s.held          # a forward at the peak count follows an earlier backward
    grads_fwd = reduced if recipe.grads_held_between_steps else (grads_between if steady else 0.0)
    # the backward at the peak count: gradients already there (persistent, or from an earlier backward) and
    # those it creates as it frees its micro-batch's activations (the first backward of the step). Its peak is
    # at the loss's backward (all activations, the logits' gradient buffers), at the first block (all
    # activations, a block's working set), at the last block (the micro-batch's activations traded for the new
    # gradients but its own and the embedding's) or at its end (every new gradient): memory is linear between,
    # so these ends bound it.
    existing = grads_between if (recipe.grads_held_between_steps or steady) else 0.0
    new = 0.0 if (recipe.grads_held_between_steps or steady) else grads_between
    working = s.block_transient + reduce_buffer
    # at the last block, its own gradients and the embedding's are still to come
    pending = min(new, (s.block_params + s.last_params) * (new / s.params)) if s.params > 0 else 0.0
    points = [(between_blocks, s.acts_held, existing, s.head_backward),
              (in_block, s.acts_held, existing, working),
              (in_block, s.acts_held - s.acts_one, existing + new - pending, working),
              (between_blocks, s.acts_held - s.acts_one, existing + new, 0.0)]   # the embedding's, the last
    gathered_bwd, acts_bwd, grads_bwd, transient_bwd = max(points, key=sum)
    held = s.autocast_copies + s.pipeline_buffers + s.inflight_outputs
    # the forward peaks at the loss (the last block's parameters freed when resharded) or in the last block
    # (gathered, the loss's activations not yet made)
    at_loss = (between_blocks, s.acts_held, held + s.head_transient)
    at_last_block = (in_block, s.acts_held - s.head_acts, held)
    gathered_fwd, acts_fwd, other_fwd = max(at_loss, at_last_block, key=sum)
    forward = PhaseMemory(params=weights + gathered_fwd, grads=grads_fwd, optimizer=opt_states,
                          activations=acts_fwd, other=other_fwd)
    backward = PhaseMemory(params=weights + gathered_bwd, grads=grads_bwd, optimizer=opt_states,
                           activations=acts_bwd, other=held + transient_bwd)
    temp_share = regime.dp if regime.zero >= recipe.moments_sharded_from else 1
    optimizer = PhaseMemory(params=weights, grads=reduced, optimizer=opt_states, activations=0.0,
                            other=s.pipeline_buffers + s.params * recipe.optimizer_temp_bytes / temp_share)
    return Timeline({"forward": forward, "backward": backward, "optimizer": optimizer})
