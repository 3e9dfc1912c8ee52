"""A count of live tensor storages over time, by category: the measuring instrument of
`profiler.memory_trace`.

`StorageLedger` is a TorchDispatchMode that sees every dispatched op (DTensor ops are let through to their
local ops first) and registers each distinct untyped storage of its inputs and outputs once, with a
weak-reference finalizer that records its release; `UntypedStorage.resize_` (FSDP2's way of freeing and
re-allocating unsharded parameters) is wrapped to record size changes. Sizes are
`UntypedStorage.nbytes()`: exact tensor bytes, no allocator rounding, caching or fragmentation, and no
scratch memory a kernel allocates without a tensor (gloo's internal buffers, oneDNN workspaces).

Categories (CATEGORIES) are given by the caller (`assign`) or found by the ledger: tensors autograd saves
(`torch.autograd.graph.saved_tensors_hooks`) and those a checkpoint's recomputation rebuilds and keeps (ops
in backward with grad mode on or inside a module's forward) are saved activations; 16-bit copies of
parameters (`aten._to_copy` of a parameter's storage) are parameter copies; the rest are temporaries. A
category holds for the storage's whole lifetime, and of several the first in CATEGORIES wins.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

CATEGORIES = ("parameters", "parameter_copies", "buffers", "gradients", "gradient_buffers", "optimizer_states",
              "pipeline_buffers", "saved_activations", "temporaries")
_RANK = {c: i for i, c in enumerate(CATEGORIES)}
TOP_TEMPORARIES = 5


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The untyped storages holding the data of `t` (the local tensors of a DTensor or other wrapper);
    none for meta and fake tensors (DTensor's sharding propagation computes on fake global-shape ones)."""
    if isinstance(t, FakeTensor):
        return []
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        inner = (getattr(t, a) for a in attrs)
        return [st for x in inner if isinstance(x, torch.Tensor) for st in _storages(x)]
    if t.device.type == "meta":
        return []
    return [t.untyped_storage()]


@dataclass
class Phase:
    """One span of the event log: `name` of step `step` (None for the build), on pipeline stage `stage`,
    for micro-batch `microbatch` (None where the phase is not per micro-batch); starts at event `start`."""

    name: str
    step: int | None
    stage: int | None
    microbatch: int | None
    start: int


class StorageLedger(TorchDispatchMode):
    """The size of every tensor storage over time (bytes), as a log of events, with phase markers.

    Active as a context manager; `begin` starts a phase; `assign` gives a tensor's storages a category;
    `timeline` replays the log into per-phase peaks. `before_phase()` (set by the caller) runs at every
    `begin`, to assign categories; `on_backward(graph_task_id)` runs when an op first runs in a new
    autograd backward call."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[int, int]] = []      # (storage uid, its size in bytes from now on; 0: freed)
        self.phases: list[Phase] = []
        self.role: dict[int, str] = {}               # storage uid -> category (absent: temporaries)
        self.origin: dict[int, tuple[str, str, str, tuple[int, ...]]] = {}   # uid -> (op, module, dtype, shape)
        self.module_names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.before_phase: Callable[[], None] | None = None
        self.on_backward: Callable[[int], None] | None = None
        self._uid: dict[int, int] = {}               # id(live storage) -> uid
        self._refs: dict[int, weakref.ref] = {}      # uid -> weak reference carrying the release callback
        self._size: dict[int, int] = {}              # uid -> current bytes, live storages only
        self._next_uid = 0
        self._graph_task = -1
        self._recomputed: list[int] | None = None    # uids made by the open recomputation, if one is open
        self._modules: list[str] = []
        self._open = False

    # -- storages --------------------------------------------------------------------------------
    def track(self, t: torch.Tensor, op: str = "", kind: str | None = None) -> list[int]:
        """Register the storages of `t` (recording a size change of known ones); returns their uids."""
        uids = []
        for st in _storages(t):
            key = id(st)
            uid = self._uid.get(key)
            if uid is None:
                uid = self._next_uid
                self._next_uid += 1
                self._uid[key] = uid
                self._refs[uid] = weakref.ref(st, self._release_callback(uid, key))
                self._size[uid] = st.nbytes()
                self.origin[uid] = (op, self._modules[-1] if self._modules else "", str(t.dtype).replace(
                    "torch.", ""), tuple(t.shape))
                self.events.append((uid, self._size[uid]))
                if self._recomputed is not None:
                    self._recomputed.append(uid)
            elif st.nbytes() != self._size[uid]:
                self._resized(uid, st.nbytes())
            if kind is not None:
                self._set_role(uid, kind)
            uids.append(uid)
        return uids

    def assign(self, t: torch.Tensor | None, kind: str) -> None:
        """`t`'s storages belong to category `kind` (unless they hold one earlier in CATEGORIES)."""
        if isinstance(t, torch.Tensor):
            self.track(t, kind=kind)

    def _set_role(self, uid: int, kind: str) -> None:
        old = self.role.get(uid)
        if old is None or _RANK[kind] < _RANK[old]:
            self.role[uid] = kind

    def _resized(self, uid: int, nbytes: int) -> None:
        self._size[uid] = nbytes
        self.events.append((uid, nbytes))

    def _release_callback(self, uid: int, key: int):
        def released(_ref):
            if self._uid.get(key) == uid:
                del self._uid[key]
            self._refs.pop(uid, None)
            self._size.pop(uid, None)
            if self._open:
                self.events.append((uid, 0))
        return released

    # -- phases ----------------------------------------------------------------------------------
    def begin(self, name: str, step: int | None = None, stage: int | None = None,
              microbatch: int | None = None) -> None:
        if self.before_phase is not None:
            self.before_phase()
        self.phases.append(Phase(name, step, stage, microbatch, len(self.events)))

    # -- interception ----------------------------------------------------------------------------
    def __enter__(self):
        self._open = True
        self._orig_resize = torch.UntypedStorage.resize_
        ledger, orig = self, self._orig_resize

        def resize_(st, size):
            out = orig(st, size)
            uid = ledger._uid.get(id(st))
            if uid is not None and st.nbytes() != ledger._size[uid]:
                ledger._resized(uid, st.nbytes())
            return out

        torch.UntypedStorage.resize_ = resize_
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter_module),
                       torch.nn.modules.module.register_module_forward_hook(self._leave_module, always_call=True)]
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            super().__exit__(*exc)
        finally:
            self._saved.__exit__(*exc)
            for h in self._hooks:
                h.remove()
            torch.UntypedStorage.resize_ = self._orig_resize
            self._close_recomputation()
            self._open = False
        return False

    def _enter_module(self, module, _args):
        self._modules.append(self.module_names.get(module, type(module).__name__))

    def _leave_module(self, _module, _args, _out):
        if self._modules:
            self._modules.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        """Saved for backward. Returns an alias without autograd history: returning `t` itself would tie
        an output to its own node in a cycle through C++ that never frees a graph no backward consumes
        (torch.distributed.pipelining's metadata-inference forward)."""
        self.assign(t, "saved_activations")
        return t.detach()

    def _close_recomputation(self) -> None:
        """Storages rebuilt by a checkpoint's recomputation that outlive it are kept for backward."""
        if self._recomputed is not None:
            for uid in self._recomputed:
                if uid in self._size:
                    self._set_role(uid, "saved_activations")
            self._recomputed = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented                    # let DTensor run its local ops, which come back here
        gid = torch._C._current_graph_task_id()
        if gid != -1 and gid != self._graph_task:
            self._graph_task = gid
            if self.on_backward is not None:
                self.on_backward(gid)
        # an op inside backward with grad mode on, or inside a module's forward (custom autograd Functions
        # run their forward without grad), is a checkpoint's recomputation
        recomputing = gid != -1 and (torch.is_grad_enabled() or bool(self._modules))
        if recomputing and self._recomputed is None:
            self._recomputed = []
        elif not recomputing:
            self._close_recomputation()
        out = func(*args, **(kwargs or {}))
        flat_in, _ = tree_flatten((args, kwargs))
        in_uids = [u for t in flat_in if isinstance(t, torch.Tensor) for u in self.track(t)]
        copy_of_param = (func is torch.ops.aten._to_copy.default
                         and any(self.role.get(u) == "parameters" for u in in_uids))
        name = func.__name__
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t, name, "parameter_copies" if copy_of_param else None)
        return out

    # -- results ---------------------------------------------------------------------------------
    def timeline(self) -> list[dict]:
        """Per phase: the peak of live bytes, the bytes by category at that peak and at the phase's end, each
        category's own maximum within the phase, the most bytes of temporaries made in the phase alive at
        once (the phase's own working set, blind to leftovers of earlier phases such as a gloo collective's
        buffer its worker thread releases late), and the largest temporaries at the peak."""
        bounds = [p.start for p in self.phases] + [len(self.events)]
        size: dict[int, int] = {}
        born: dict[int, int] = {}                       # uid -> phase in which it was registered
        totals = dict.fromkeys(CATEGORIES, 0)
        total = 0
        records, peak_at = [], []
        for k, phase in enumerate(self.phases):
            peak, peak_cat, at, most = total, dict(totals), bounds[k], dict(totals)
            own = own_max = 0
            for i in range(bounds[k], bounds[k + 1]):
                uid, nbytes = self.events[i]
                delta = nbytes - size.get(uid, 0)
                size[uid] = nbytes
                born.setdefault(uid, k)
                cat = self.role.get(uid, "temporaries")
                totals[cat] += delta
                most[cat] = max(most[cat], totals[cat])
                if cat == "temporaries" and born[uid] == k:
                    own += delta
                    own_max = max(own_max, own)
                total += delta
                if total > peak:
                    peak, peak_cat, at = total, dict(totals), i + 1
            records.append({"phase": phase.name, "step": phase.step, "stage": phase.stage,
                            "microbatch": phase.microbatch, "peak_bytes": peak, "by_category": peak_cat,
                            "end_bytes": total, "end_by_category": dict(totals), "max_by_category": most,
                            "own_temporaries_max": own_max})
            peak_at.append(at)
        for rec, temps in zip(records, self._temporaries_at(peak_at)):
            rec["top_temporaries"] = temps
        return records

    def _temporaries_at(self, indices: list[int]) -> list[list[dict]]:
        """The largest live temporaries after the first `i` events, for each i in `indices` (ascending)."""
        size: dict[int, int] = {}
        out, pos = [], 0
        for i in indices:
            for uid, nbytes in self.events[pos:i]:
                if nbytes:
                    size[uid] = nbytes
                else:
                    size.pop(uid, None)
            pos = i
            temps = sorted((n, uid) for uid, n in size.items() if uid not in self.role)[-TOP_TEMPORARIES:]
            out.append([{"bytes": n, "op": self.origin[uid][0], "module": self.origin[uid][1],
                         "dtype": self.origin[uid][2], "shape": list(self.origin[uid][3])}
                        for n, uid in reversed(temps)])
        return out
