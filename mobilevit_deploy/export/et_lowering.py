"""How long each phase of the ExecuTorch lowering takes, and the one change that makes it fast.

Phases (seconds, the manifest's `timings_s` keys `lower.<phase>`):

- `decompositions`: our own rewrite before lowering (`decompose_for_xnnpack`: LayerNorm for XNNPACK);
- `edge_dialect`: ExecuTorch's ATen -> Edge conversion (its decompositions, op checks), the first
  step of `to_edge_transform_and_lower`;
- `partitioning`: the partitioner choosing the delegated subgraphs;
- `delegate_preprocess`: the backend compiling each subgraph (XNNPACK: its ~17 graph passes, then
  the flatbuffer of the delegate payload);
- `to_executorch`: memory planning and emission of the program;
(`serialization`, writing the `.pte`, is timed by the export's Compress stage.)

The phases are timed by wrapping, for the duration of one lowering, the three ExecuTorch entry
points that bound them (`_gen_edge_manager_for_partitioners`, the partitioner's `partition`, the
backend's `preprocess`); if a newer ExecuTorch renames one, that phase is left out and its time
falls into the enclosing one (the total `lower` time is always measured).

**Provenance trimming** (`shallow_provenance`): every FX pass that re-traces the graph (each
XNNPACK pass, each Edge pass: ~40 per lowering) gives each new node `meta["from_node"]`, a
`NodeSource` holding a *deep copy* of its parent's whole provenance chain. The chain grows by one
level per pass, so the copies grow with the number of passes run so far: measured with cProfile on
mobilevit_xxs at 64 px, `copy.deepcopy` under `NodeSource.__init__` was ~67 s of a ~300 s lowering
on this (loaded) machine. What is read of the chain: the direct parent (`from_node[-1].name`, by
torch.export to map graph-signature names) and the root (ExecuTorch groups debug handles by the
greatest ancestor). So, while our lowering runs, each new `NodeSource` keeps its direct parents and,
as their only ancestor, the root of their chain -- at most two levels instead of one per pass. The
lowered program is byte-identical (tests/test_export_profile.py compares the `.pte` bytes).
"""
from __future__ import annotations

import contextlib
import copy
import time

__all__ = ["shallow_provenance", "PhaseTimer"]


@contextlib.contextmanager
def shallow_provenance():
    """While active, `NodeSource(node)` copies only the direct parents of `node` (depth 1), not the
    whole chain. No-op if torch's NodeSource does not look as expected."""
    try:
        from torch.fx import traceback as fx_tb

        ns_cls = fx_tb.NodeSource
        orig_init = ns_cls.__init__
    except (ImportError, AttributeError):
        yield
        return

    def _bare(src):
        c = copy.copy(src)
        c.from_node = []
        if hasattr(c, "_dict"):
            c._dict = None
        return c

    def _shallow(src):
        # the direct parent, and (as its only ancestor) the root of its chain: what ExecuTorch's
        # debug handles are grouped by (debug_handle_utils.get_greatest_ancestor_node_identifier)
        root = src
        while getattr(root, "from_node", None):
            root = root.from_node[-1]
        c = _bare(src)
        if root is not src:
            c.from_node = [_bare(root)]
        return c

    def init(self, node, pass_name="", action=None):
        if node is not None and "from_node" in getattr(node, "meta", {}):
            meta = node.meta
            saved = meta["from_node"]
            try:
                meta["from_node"] = [_shallow(s) for s in saved] if isinstance(saved, list) else saved
                orig_init(self, node, pass_name, action)
            finally:
                meta["from_node"] = saved
        else:
            orig_init(self, node, pass_name, action)

    ns_cls.__init__ = init
    try:
        yield
    finally:
        ns_cls.__init__ = orig_init


class PhaseTimer:
    """Accumulates wall time per phase name: `with timer.phase("x"): ...`, or by wrapping a callable."""

    def __init__(self):
        self.s: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            with self.phase(name):
                return fn(*a, **k)

        return timed

    @contextlib.contextmanager
    def executorch_phases(self, partitioners: list):
        """Time edge_dialect / partitioning / delegate_preprocess inside `to_edge_transform_and_lower`."""
        undo = []
        try:
            from executorch.exir.program import _program

            orig = _program._gen_edge_manager_for_partitioners
            _program._gen_edge_manager_for_partitioners = self.wrap("edge_dialect", orig)
            undo.append(lambda: setattr(_program, "_gen_edge_manager_for_partitioners", orig))
        except (ImportError, AttributeError):
            pass
        for p in partitioners:
            if hasattr(p, "partition"):
                orig_p = p.partition
                p.partition = self.wrap("partitioning", orig_p)
                undo.append(lambda p=p: p.__dict__.pop("partition", None))
        try:
            from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

            raw = XnnpackBackend.__dict__.get("preprocess")
            if isinstance(raw, staticmethod):
                XnnpackBackend.preprocess = staticmethod(self.wrap("delegate_preprocess", raw.__func__))
                undo.append(lambda: setattr(XnnpackBackend, "preprocess", raw))
        except ImportError:
            pass
        try:
            yield self
        finally:
            for u in reversed(undo):
                u()
