"""How long each phase of the ExecuTorch lowering takes, and the one change that makes it fast.

Phases (seconds, the manifest's `timings_s` keys `lower.<phase>`):

- `import`: the first `import executorch.exir` of the process (`import_exir`);
- `decompositions`: our own rewrite before lowering (`decompose_for_xnnpack`: LayerNorm for XNNPACK);
- `edge_dialect`: ExecuTorch's ATen -> Edge conversion (its decompositions, op checks), the first
  step of `to_edge_transform_and_lower`;
- `partitioning`: the partitioner choosing the delegated subgraphs;
- `delegate_preprocess`: the backend compiling each subgraph (XNNPACK: its ~17 graph passes, then
  the flatbuffer of the delegate payload);
- `validate`: the lowered program's verifiers, run once (`validate_once`);
- `to_executorch`: memory planning and emission of the program;
(`serialization`, writing the `.pte`, is timed by the export's Compress stage.)

**Import** (`import_exir`): importing `executorch.exir` parses the Edge dialect's operator table
(`edge.yaml`, 138 kB) with ruamel's pure-Python safe loader, ~1.3-2 s of a ~4-8 s import. Imported
through `import_exir`, the same file is parsed by libyaml (PyYAML's `CSafeLoader`, ~0.2 s); the
parsed table is the same (tests/test_export_profile.py compares both loaders on the installed file).

**Validate once** (`validate_once`): every `ExportedProgram` built while lowering (after each Edge
and XNNPACK pass, ~20 per lowering) re-runs the verifiers (graph invariants, Edge dialect dtype
tables): ~12 % of the lowering. While active, those checks are deferred, and the programs that
matter are validated once each: the whole program in the Edge dialect (after the ATen -> Edge
conversion, before partitioning: every op's dtypes checked) and the lowered result. The program is
unchanged (checks do not rewrite it); what is lost is only the name of the pass that broke the IR, if
one ever did.

**Delegate outputs from metadata** (`delegate_outputs_from_meta`): every pass that re-traces the
program after partitioning (`to_executorch`'s spec propagation and dim-order legalisation, ...) meets
the delegate call and, to know its outputs' shapes, runs the delegated subgraph's whole original
program again on fake tensors (~0.3-0.5 s each for mobilevit_xxs). While active, the fake outputs are
made from the shapes, strides and dtypes that program already records on its output node; programs
with outputs other than plain user outputs take ExecuTorch's own path. Byte-identical `.pte`
(tests/test_export_profile.py).

**Lean XNNPACK passes** (`lean_xnnpack_passes`): XNNPACK's preprocess runs 17 graph passes, each
followed by a re-trace of the whole program (~0.5 s each for mobilevit_xxs at 64 px, 2.3 s for the
bilinear-upsample pass, which first exports its pattern graphs). Most of them rewrite one kind of
op (PReLU, conv1d, max-pool getitems, dim-order copies, batch norms left unfused, ReLU/hardtanh
fusion, concatenations of more than 5 inputs, ...) and leave a program without that op unchanged.
While active, a pass runs only if the program holds what it acts on (`_PASS_APPLIES`, a necessary
condition read from each pass's source); passes not in the table always run. The lowered program is
byte-identical (tests/test_export_profile.py). `lean_edge_passes` does the same for four of the ATen ->
Edge passes (`_EDGE_PASS_APPLIES`: `aten.t` normalisation, view ops left un-copied, symbolic values,
elementwise ops of mixed dtypes), each another full re-trace (~0.5-0.9 s) that a static float program
passes through unchanged.

**Fused Edge passes** (`fused_edge_passes`): seven of the ATen -> Edge passes only rewrite one operator
call at a time -- torch's ReplaceViewOpsWithViewCopyOpsPass, then ExecuTorch's NormalizeTransposePass,
ReplaceBrokenOpsWithFunctionalOpsPass, ScalarToTensorPass, RemoveMixedTypeOperators, OpReplacePass (ATen ->
Edge operators) and MemoryFormatOpsPass, each overriding `call_operator` -- and each that runs re-traces
the whole program (~0.6 s each for mobilevit_xxs at 64 px; four ran). Run as one class whose method
resolution order chains their `call_operator`s (the torch pass's four lines restated on ExecuTorch's
`ExportPass`), they re-trace once. ExecuTorch runs graph-level passes between them (symbolic sizes and
values, no-op `to`/slice/`_to_copy` removal, empty-tensor `cat` pruning, dequantize -> quantize folding);
the fused form is used only when none of those can act on the program (`_graph_passes_inert`), else
ExecuTorch's own sequence. Byte-identical `.pte` (tests/test_export_profile.py).

**Deferred XNNPACK re-traces** (`deferred_xnnpack_retraces`): XNNPACK's FuseBatchNormPass and
ChannelsLastTaggedReshapePass edit the graph and then re-trace the whole program only to refresh its
metadata (~0.5-0.6 s each); RemoveRedundantCopyPass, which runs after them, re-traces it again. In a
float program their closing re-trace is skipped and paid by the next pass that always re-traces (or by
one re-trace after the last pass, if none ran): the passes in between read the edited graph, whose
nodes keep their own shapes. Byte-identical `.pte` (tests/test_export_profile.py).

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

__all__ = ["shallow_provenance", "lean_xnnpack_passes", "lean_edge_passes", "skip_noop_decompositions",
           "edge_decomposition_table", "import_exir", "validate_once", "delegate_outputs_from_meta",
           "fused_edge_passes", "deferred_xnnpack_retraces", "PhaseTimer"]


@contextlib.contextmanager
def _swapped(owner, name, value):
    """`owner.name = value` (`owner[name] = value` for a dict) while active, the original put back
    afterwards (the one patch-and-restore of this module's context managers)."""
    get, put = (dict.__getitem__, dict.__setitem__) if isinstance(owner, dict) else (getattr, setattr)
    orig = get(owner, name)
    put(owner, name, value)
    try:
        yield
    finally:
        put(owner, name, orig)


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

    with _swapped(ns_cls, "__init__", init):
        yield


def _op_names(ep) -> set:
    return {getattr(n.target, "__name__", str(n.target)) for n in ep.graph.nodes if n.op == "call_function"}


def _linear_mm(ep) -> bool:
    """ConvertToLinearPass: an [add]mm anywhere (its fallback transform), or a bmm inside the source
    partition of an nn.Linear / F.linear (its main loop)."""
    import torch
    from torch.fx.passes.utils.source_matcher_utils import get_source_partitions

    names = _op_names(ep)
    if names & {"aten.mm.default", "aten.addmm.default"}:
        return True
    if "aten.bmm.default" not in names:
        return False
    parts = get_source_partitions(ep.graph, [torch.nn.Linear, torch.nn.functional.linear])
    return any(getattr(n.target, "__name__", "") == "aten.bmm.default"
               for ps in parts.values() for p in ps for n in p.nodes)


def _const_inputs_only(ep) -> bool:
    """ConstPropPass folds an op whose every argument is a real constant: a call with no input node,
    or with get_attr inputs only (parameters are placeholders, hence fake tensors, while it re-traces)."""
    return any(n.op == "call_function" and all(a.op == "get_attr" for a in n.all_input_nodes)
               for n in ep.graph.nodes)


def _has(*ops):
    return lambda ep: bool(_op_names(ep) & set(ops))


# SDPA patterns (executorch.backends.xnnpack.partition.graphs.sdpa): ops every pattern holds, so a
# program without one of them cannot match (checked against the patterns in tests/test_export_profile.py)
SDPA_KEY_OPS = frozenset({"aten._softmax.default", "aten.bmm.default", "aten.any.dim", "aten.where.self"})
BILINEAR_KEY_OPS = frozenset({"aten.upsample_bilinear2d.vec"})

_PASS_APPLIES = {
    "DimOrderOpsRevertPass": lambda ep: any("dim_order" in s for s in _op_names(ep)),
    "ConvertToUpsampleBilinear2d": lambda ep: BILINEAR_KEY_OPS <= _op_names(ep),
    "ConvertToLinearPass": _linear_mm,
    "PropagateCustomMetaPass": lambda ep: any("custom" in n.meta for n in ep.graph.nodes),
    "ConvertToSDPAPass": lambda ep: SDPA_KEY_OPS <= _op_names(ep),
    "ConstPropPass": _const_inputs_only,
    "DecomposeBatchNorm": _has("aten.native_batch_norm.default", "aten._native_batch_norm_legit_no_training.default"),
    "FuseActivationPass": _has("aten.relu.default", "aten.hardtanh.default"),
    "DecomposeConcatenate": lambda ep: any(getattr(n.target, "__name__", "") == "aten.cat.default"
                                           and len(n.args[0]) > 5 for n in ep.graph.nodes if n.op == "call_function"),
    "RemoveGetItemPass": _has("aten.max_pool2d_with_indices.default", "aten.max.dim"),
    "Conv1dUnsqueezePass": lambda ep: any(getattr(n.target, "__name__", "") == "aten.convolution.default"
                                          and getattr(n.meta.get("val"), "ndim", 4) == 3 for n in ep.graph.nodes),
    "PReLUReshapePass": _has("aten._prelu_kernel.default"),
    "RemoveRedundantCopyPass": _has("aten._to_copy.default"),
}


_MIXED_TYPE_OPS = ("aten.add.Tensor", "aten.mul.Tensor", "aten.sub.Tensor", "aten.div.Tensor", "aten.div.Tensor_mode",
                   "aten.minimum.default")


def _mixed_type(gm) -> bool:
    """RemoveMixedTypeOperators casts the inputs of an add/mul/sub/div/minimum to their promoted dtype:
    it can change something only if such an op has a non-tensor input, inputs of differing dtypes, or a
    non-floating dtype (integer division promotes to float)."""
    import torch

    for n in gm.graph.nodes:
        if n.op != "call_function" or getattr(n.target, "__name__", str(n.target)) not in _MIXED_TYPE_OPS:
            continue
        if len(n.args) <= 1:
            continue
        dtypes = set()
        for a in n.args:
            val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
            if not isinstance(val, torch.Tensor):
                return True
            dtypes.add(val.dtype)
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
            return True
    return False


def _has_view_op(gm) -> bool:
    """ReplaceBrokenOpsWithFunctionalOpsPass replaces view ops (OpOverload.is_view) by their _copy forms."""
    import torch

    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.is_view
               for n in gm.graph.nodes)


def _has_symbolic(gm) -> bool:
    """SymToTensorPass wraps SymInt / SymFloat / SymBool values used as tensors."""
    import torch

    return any(isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool)) for n in gm.graph.nodes)


_EDGE_PASS_APPLIES = {
    "NormalizeTransposePass": lambda gm: any(
        n.op == "call_function" and getattr(n.target, "__name__", "") == "aten.t.default" for n in gm.graph.nodes),
    "ReplaceBrokenOpsWithFunctionalOpsPass": _has_view_op,
    "SymToTensorPass": _has_symbolic,
    "RemoveMixedTypeOperators": _mixed_type,
}


@contextlib.contextmanager
def lean_edge_passes(record: list | None = None):
    """While active, the ATen -> Edge conversion skips the passes of `_EDGE_PASS_APPLIES` that cannot
    change the graph; `record` receives (pass name, ran). No-op if ExecuTorch's helper moved."""
    try:
        from executorch.exir.program import _program
        from torch.fx.passes.infra.pass_base import PassResult

        orig = _program._get_aten_to_edge_passes
    except (ImportError, AttributeError):
        yield
        return

    def guard(p):
        name = getattr(p, "__name__", None) or type(p).__name__
        applies = _EDGE_PASS_APPLIES.get(name)
        if applies is None:
            return p

        def guarded(gm):
            ran = applies(gm)
            if record is not None:
                record.append((name, ran))
            return p(gm) if ran else PassResult(gm, False)

        guarded.__wrapped__ = p
        return guarded

    def get_passes(config):
        pre, post = orig(config)
        return [guard(p) for p in pre], post

    with _swapped(_program, "_get_aten_to_edge_passes", get_passes):
        yield


# XNNPACK passes that end by re-tracing the whole program only to refresh its metadata, and whose
# re-trace can wait for the next one (tests/test_export_profile.py: byte-identical .pte) ...
_RETRACE_DEFERRABLE = ("FuseBatchNormPass", "ChannelsLastTaggedReshapePass")
# ... and passes that always end with that full re-trace (so they pay one owed)
_RETRACE_PAYERS = ("RemoveRedundantCopyPass",)
_DEFER_RETRACES: list = []  # the active deferred_xnnpack_retraces' records (innermost last)
_VALIDATION_DEFERRED: list = []  # non-empty while validate_once is active


def _no_retrace(self, graph_module):
    from torch.fx.passes.infra.pass_base import PassResult

    return PassResult(graph_module, True)


@contextlib.contextmanager
def deferred_xnnpack_retraces(record: list | None = None):
    """While active (and `lean_xnnpack_passes` and `validate_once` too: the first owns the pass loop, the
    second keeps the verifiers off the programs with stale metadata in between), the closing re-trace of the
    XNNPACK passes of `_RETRACE_DEFERRABLE` is skipped in float programs and paid by the next pass that
    re-traces anyway, or by one re-trace after the last pass (see the module docstring). `record`
    receives the name of each pass run without its re-trace, and "re-trace" per re-trace paid at the end."""
    _DEFER_RETRACES.append(record if record is not None else [])
    try:
        yield
    finally:
        _DEFER_RETRACES.pop()


@contextlib.contextmanager
def lean_xnnpack_passes(record: list | None = None):
    """While active, XNNPACK's preprocess skips the passes that cannot change the program (see the
    module docstring); `record` receives (pass name, ran) per pass and delegated subgraph. No-op if
    ExecuTorch's pass manager moved."""
    try:
        from executorch.backends.xnnpack import _passes as xp
        from executorch.backends.xnnpack._passes.xnnpack_pass import XNNPACKPass
        from executorch.exir.pass_base import ExportPass

        cls = xp.XNNPACKPassManager
        orig = cls.transform
        _transform = xp._transform
    except (ImportError, AttributeError):
        yield
        return

    def transform(self):
        if not all(issubclass(p, (XNNPACKPass, ExportPass)) for p in self.passes):
            return orig(self)  # a pass kind this wrapper does not know: ExecuTorch's own loop
        ep = self.exported_program
        defer = _DEFER_RETRACES[-1] if _DEFER_RETRACES and _VALIDATION_DEFERRED else None
        if defer is not None and any("quantize" in s for s in _op_names(ep)):
            defer = None  # float programs only (what the byte-identical tests cover)
        owed = False  # a deferred closing re-trace not yet paid
        for pass_ in self.passes:
            name = pass_.__name__
            applies = _PASS_APPLIES.get(name)
            ran = applies is None or applies(ep)
            if record is not None:
                record.append((name, ran))
            if not ran:
                continue
            p = pass_(ep) if issubclass(pass_, XNNPACKPass) else pass_()
            if defer is not None and name in _RETRACE_DEFERRABLE:
                with _swapped(ExportPass, "call", _no_retrace):
                    ep = _transform(ep, p)
                owed = True
                defer.append(name)
                continue
            ep = _transform(ep, p)
            owed = owed and name not in _RETRACE_PAYERS
        if owed:
            ep = _transform(ep, ExportPass())
            defer.append("re-trace")
        return ep

    with _swapped(cls, "transform", transform):
        yield


def edge_decomposition_table(ep, partitioners: list) -> dict | None:
    """The operator decompositions `to_edge_transform_and_lower(ep, partitioner=partitioners)` applies in
    its second `run_decompositions` (ExecuTorch's default table without the ops the partitioner keeps
    whole, as `_gen_edge_manager_for_partitioners` computes it); None if ExecuTorch's helpers moved or
    there is not exactly one partitioner."""
    if len(partitioners) != 1:
        return None
    try:
        from executorch.exir.program import _program
        from executorch.exir.tracer import _default_decomposition_table
    except ImportError:
        return None
    part = partitioners[0]
    try:
        keep, _ = part.ops_to_not_decompose(ep)
        if not _program._can_skip_using_EDGE_DO_NOT_DECOMP(part, ep):
            keep = _program._remove_invalid_ops_for_not_decompose(keep)
    except (AttributeError, TypeError):
        return None
    table = _default_decomposition_table()
    for op in keep:
        table.pop(op, None)
    return dict(table.items())


@contextlib.contextmanager
def skip_noop_decompositions(record: list | None = None):
    """While active, `ExportedProgram.run_decompositions(table)` on a program that is itself the output
    of `run_decompositions` returns it unchanged when `table` is an explicit table holding none of its
    ops (see the module docstring); `record` receives True per skipped call, False per call run."""
    try:
        from executorch.exir.graph_module import contains_any_call_fn_target_op
        from torch.export import ExportedProgram
    except ImportError:
        yield
        return
    import weakref

    orig = ExportedProgram.run_decompositions
    functional = weakref.WeakSet()

    def run_decompositions(self, decomp_table=None, *args, **kwargs):
        skip = (not args and not kwargs and decomp_table is not None and self in functional
                and not contains_any_call_fn_target_op(self.graph_module, list(decomp_table.keys())))
        if record is not None:
            record.append(skip)
        if skip:
            return self
        out = orig(self, decomp_table, *args, **kwargs)
        functional.add(out)
        return out

    with _swapped(ExportedProgram, "run_decompositions", run_decompositions):
        yield


def import_exir():
    """`import executorch.exir`, its Edge-dialect operator table parsed by libyaml instead of ruamel's
    pure-Python loader (see the module docstring). Plain import if it is already imported or either
    YAML library is missing."""
    import importlib
    import sys

    try:
        import ruamel.yaml
        import yaml

        c_loader = yaml.CSafeLoader
        real = ruamel.yaml.YAML
    except (ImportError, AttributeError):
        c_loader = None
    if c_loader is None or "executorch.exir.dialects.edge._ops" in sys.modules:
        return importlib.import_module("executorch.exir")

    class _LibyamlSafe:
        """`ruamel.yaml.YAML(typ="safe")`'s load by libyaml; any other kind is ruamel's own."""

        def __new__(cls, *args, typ=None, **kwargs):
            if args or kwargs or typ != "safe":
                return real(*args, typ=typ, **kwargs)
            return super().__new__(cls)

        def load(self, stream):
            return yaml.load(stream, Loader=c_loader)

    with _swapped(ruamel.yaml, "YAML", _LibyamlSafe):
        exir = importlib.import_module("executorch.exir")
        _ops = importlib.import_module("executorch.exir.dialects.edge._ops")
    _ops.YAML = real  # nothing of the swap outlives the import
    return exir


@contextlib.contextmanager
def validate_once(record: list | None = None):
    """While active, `ExportedProgram` verification is deferred (see the module docstring): the
    ATen -> Edge conversion's programs are validated once each as it returns them; the caller
    validates the lowered result (`validate_now`). `record` receives "deferred" / "validated" per call.
    No-op if ExecuTorch's helper moved."""
    try:
        from executorch.exir.program import _program
        from torch.export import ExportedProgram

        ExportedProgram._validate  # noqa: B018 -- the attribute the patch replaces must exist
        gen = _program._gen_edge_manager_for_partitioners
    except (ImportError, AttributeError):
        yield
        return

    def deferred(self):
        if record is not None:
            record.append("deferred")

    def gen_validated(*a, **k):
        manager = gen(*a, **k)
        for name in manager.methods:
            validate_now(manager.exported_program(name), record)
        return manager

    _VALIDATION_DEFERRED.append(True)
    try:
        with _swapped(ExportedProgram, "_validate", deferred), \
                _swapped(_program, "_gen_edge_manager_for_partitioners", gen_validated):
            yield
    finally:
        _VALIDATION_DEFERRED.pop()


def validate_now(ep, record: list | None = None):
    """Run `ep`'s verifiers now, even inside `validate_once`."""
    if record is not None:
        record.append("validated")
    if not ep.verifiers:
        raise AssertionError("ExportedProgram must have at least one verifier.")
    for v in ep.verifiers:  # ExportedProgram._validate's loop, reached past a deferring patch
        v().check(ep)


@contextlib.contextmanager
def delegate_outputs_from_meta(record: list | None = None):
    """While active, `executorch_call_delegate` under a FakeTensorMode returns fresh fake tensors shaped
    like the lowered program's recorded outputs instead of re-running it (see the module docstring);
    `record` receives True per call answered from metadata, False per call run as before. No-op if
    ExecuTorch's operator moved."""
    try:
        import torch
        from executorch.exir.delegate import executorch_call_delegate
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.export.graph_signature import OutputKind
        from torch.utils import _pytree as pytree

        table = executorch_call_delegate.python_key_table
        orig = table[FakeTensorMode]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def outputs_meta(lowered_module):
        ep = getattr(lowered_module, "original_module", None)
        if ep is None or any(o.kind != OutputKind.USER_OUTPUT for o in ep.graph_signature.output_specs):
            return None
        out = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
        vals = [getattr(a, "meta", {}).get("val") for a in out]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            return None
        return vals, ep.call_spec.out_spec

    def fake_outputs(mode, lowered_module, *args):
        meta = outputs_meta(lowered_module)
        if record is not None:
            record.append(meta is not None)
        if meta is None:
            return orig(mode, lowered_module, *args)
        vals, spec = meta
        with mode:
            fakes = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device) for v in vals]
        return pytree.tree_unflatten(fakes, spec) if spec is not None else tuple(fakes)

    with _swapped(table, FakeTensorMode, fake_outputs):
        yield


# ExecuTorch's pre-op-replace passes (executorch.exir.passes.base_pre_op_replace_passes + its mixed-type pass)
_EDGE_PRE_PASSES = ("ReplaceSymSizeOpPass", "NormalizeTransposePass", "ReplaceBrokenOpsWithFunctionalOpsPass",
                    "ScalarToTensorPass", "SymToTensorPass", "RemoveNoopPass", "PruneEmptyTensorsPass",
                    "RemoveToCopyPass", "FoldRedundantDequantizeQuantizePass", "RemoveMixedTypeOperators")


def _name(p) -> str:
    p = getattr(p, "__wrapped__", p)  # lean_edge_passes' guard
    return getattr(p, "__name__", None) or type(p).__name__


def _graph_passes_inert(gm) -> bool:
    """The graph-level passes among ExecuTorch's ATen -> Edge passes cannot change `gm`, nor can they once
    the operator-rewriting passes before them have run (those add none of the ops they act on): no
    symbolic values (ReplaceSymSizeOpPass, SymToTensorPass), no `to.dtype` / `_to_copy` / slice keeping the
    shape (RemoveNoopPass, RemoveToCopyPass), no `cat` of an empty tensor (PruneEmptyTensorsPass), no
    dequantize feeding a quantize (FoldRedundantDequantizeQuantizePass; RemoveNoopPass's dq -> q clean-up
    follows only a removal) and no dead node (their dead-code elimination)."""
    import torch
    from executorch.exir.passes.remove_noop_pass import _DEQUANT_OPS, _QUANT_OPS

    acted_on = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default}
    slices = {torch.ops.aten.slice.Tensor, torch.ops.aten.slice_copy.Tensor}  # slice becomes slice_copy first
    if _has_symbolic(gm):
        return False
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in acted_on or not n.users:
            return False
        if n.target in _DEQUANT_OPS and any(u.target in _QUANT_OPS for u in n.users):  # dq -> q folding
            return False
        if n.target in slices:  # RemoveNoopPass drops the slices that keep the shape
            src, out = n.args[0].meta.get("val"), n.meta.get("val")
            if src is None or out is None or src is out or tuple(src.shape) == tuple(out.shape):
                return False
        if n.target is torch.ops.aten.cat.default and any(
                getattr(a.meta.get("val"), "numel", lambda: 1)() == 0 for a in n.args[0]):
            return False
    return True


@contextlib.contextmanager
def fused_edge_passes(record: list | None = None):
    """While active, the ATen -> Edge conversion runs its operator-rewriting passes (view ops to copies,
    transpose normalisation, broken view ops, scalars to tensors, mixed types, ATen -> Edge operators,
    memory format to dim order) as one re-trace instead of up to seven (see the module docstring), when
    the graph-level passes ExecuTorch runs between them cannot change the program (`_graph_passes_inert`);
    otherwise ExecuTorch's own sequence. `record` receives True per fused conversion, False per
    conversion left as it was. No-op if ExecuTorch's passes moved."""
    try:
        import torch
        from executorch.exir.pass_base import ExportPass
        from executorch.exir.passes.normalize_transpose_pass import NormalizeTransposePass
        from executorch.exir.passes.remove_mixed_type_operators import RemoveMixedTypeOperators
        from executorch.exir.passes.replace_broken_ops_with_function_ops_pass import (
            ReplaceBrokenOpsWithFunctionalOpsPass,
        )
        from executorch.exir.passes.scalar_to_tensor_pass import ScalarToTensorPass
        from executorch.exir.program import _program
        from torch._export.passes import replace_view_ops_with_view_copy_ops_pass as rv
        from torch.fx.passes.infra.pass_base import PassResult

        orig_get = _program._get_aten_to_edge_passes
        view_copy, op_replace, memory_format = (_program.ReplaceViewOpsWithViewCopyOpsPass, _program.OpReplacePass,
                                                _program.MemoryFormatOpsPass)
        functional, view_copy_of = rv._NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS, rv.get_view_copy_of_view_op
    except (ImportError, AttributeError):
        yield
        return

    class ViewCopy(ExportPass):
        """torch's ReplaceViewOpsWithViewCopyOpsPass.call_operator, on ExecuTorch's ExportPass."""

        def call_operator(self, op, args, kwargs, meta):
            if op in functional:
                op = functional[op]
            elif not isinstance(op, torch._ops.HigherOrderOperator):
                op = view_copy_of(op._schema) or op
            return super().call_operator(op, args, kwargs, meta)

    fused_out: list = []  # graph modules the fused pass returned (the passes it stands for skip them)
    state: dict = {}  # of the conversion under way: the fused pass class, or None

    def stand_in(real):
        def run(gm):
            if any(gm is g for g in fused_out):
                return PassResult(gm, False)
            return real(gm)

        run.__wrapped__ = real
        return run

    def get_passes(config):
        pre, post = orig_get(config)
        state["fused"] = None
        if tuple(_name(p) for p in pre) != _EDGE_PRE_PASSES:
            return pre, post
        bases = (ViewCopy, NormalizeTransposePass, ReplaceBrokenOpsWithFunctionalOpsPass, ScalarToTensorPass,
                 RemoveMixedTypeOperators, op_replace) + (() if config._skip_dim_order else (memory_format,))
        state["fused"] = type("FusedEdgePass", bases, {})  # cooperative call_operator: MRO order, one re-trace
        return [stand_in(p) for p in pre], post

    def view_copy_or_fused():
        fused, real = state.pop("fused", None), view_copy()

        def run(gm):
            ok = fused is not None and _graph_passes_inert(gm)
            if record is not None:
                record.append(ok)
            if not ok:
                return real(gm)
            res = fused()(gm)
            fused_out.append(res.graph_module)
            return res

        return run

    with _swapped(_program, "_get_aten_to_edge_passes", get_passes), \
            _swapped(_program, "ReplaceViewOpsWithViewCopyOpsPass", view_copy_or_fused), \
            _swapped(_program, "OpReplacePass", lambda: stand_in(op_replace())), \
            _swapped(_program, "MemoryFormatOpsPass", lambda: stand_in(memory_format())):
        yield


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
