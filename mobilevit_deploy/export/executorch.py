"""ExecuTorch: ExportedProgram -> `.pte`, delegated to XNNPACK (CPU) or to Core ML (iOS).

`lower` accepts any ExportedProgram, including one already quantized (pt2e / torchao), and returns
the program plus the operators left outside the delegate. `inspect_pte` reads a written `.pte`
back (delegates, operators run by the portable kernels) so a file can be checked structurally —
the only check possible for the Core ML delegate on Linux, where the executorch wheel registers no
Core ML runtime.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError

BACKENDS = ("xnnpack", "coreml")
BACKEND_IDS = {"xnnpack": "XnnpackBackend", "coreml": "CoreMLBackend"}
PRECISIONS = {"xnnpack": ("fp32",), "coreml": ("fp16", "fp32")}
DEFAULT_PRECISION = {"xnnpack": "fp32", "coreml": "fp16"}
_NOT_OPS = {"executorch_call_delegate", "getitem"}


def partitioners(backend: str, precision: str | None = None, minimum_deployment_target: str = "iOS16") -> list:
    if backend not in BACKENDS:
        raise UserError(f"unknown executorch backend {backend!r} (choose from: {', '.join(BACKENDS)})")
    precision = precision or DEFAULT_PRECISION[backend]
    if precision not in PRECISIONS[backend]:
        raise UserError(f"precision {precision!r} is not available for executorch/{backend} "
                        f"(choose from: {', '.join(PRECISIONS[backend])})")
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    from .coreml import deployment_target

    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=deployment_target(minimum_deployment_target),
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
    )
    return [CoreMLPartitioner(compile_specs=specs)]


def _op_name(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    # EdgeOpOverload / OpOverload: "aten.native_layer_norm.default"
    s = str(target)
    if s.startswith("<EdgeOpOverload: "):
        return s[len("<EdgeOpOverload: "):].split(">")[0]
    return name


def ops_outside_delegate(edge_program) -> dict[str, int]:
    """{op name: count} of call_function nodes left to the portable kernels in a lowered program."""
    counts: dict[str, int] = {}
    for node in edge_program.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name in _NOT_OPS:
            continue
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def layer_norm_for_xnnpack(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    """aten.layer_norm over the last dim, written with ops the XNNPACK partitioner delegates.

    XNNPACK has no LayerNorm: left as `native_layer_norm` it runs in the portable kernels and cuts
    the graph into one delegate call per LayerNorm (22 for MobileViT-XXS). A 4-D mean over dims
    (2, 3) with keepdim is XNNPACK's mean; sub, mul, add and rsqrt are elementwise. Same maths
    (biased variance, eps inside the square root); outputs agree to float rounding.
    (Added by the benchmark work, see benchmarks/README.md "Performance target".)
    """
    import torch

    shape = x.shape
    x4 = x.reshape(1, -1, shape[-1], 1)  # [1, rows, C, 1]: normalise over C
    mu = x4.mean(dim=(2, 3), keepdim=True)
    d = x4 - mu
    var = (d * d).mean(dim=(2, 3), keepdim=True)
    y = (d * torch.rsqrt(var + eps)).reshape(shape)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def decompose_for_xnnpack(ep, *, quantized_too: bool = False, edge_table: dict | None = None):
    """Rewrite last-dim LayerNorms of a float program so XNNPACK takes the whole graph.

    Programs with LayerNorms over several dims are returned unchanged, and so are programs with
    quantize/dequantize ops (pt2e, torchao) unless `quantized_too` (a study of that choice:
    benchmarks/profile_pte.py --ln-decomp). `edge_table` (et_lowering.edge_decomposition_table): the
    decompositions the Edge conversion applies next, applied in the same re-trace.
    """
    import torch

    ln = torch.ops.aten.layer_norm.default
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    lns = [n for n in nodes if n.target is ln]
    quantized = any(getattr(n.target, "namespace", "") in ("quantized_decomposed", "torchao") for n in nodes)
    if not lns or (quantized and not quantized_too) or any(len(n.args[1]) != 1 for n in lns):
        return ep
    return ep.run_decompositions({**(edge_table or {}), ln: layer_norm_for_xnnpack})


def lower(ep, *, backend: str = "xnnpack", precision: str | None = None, minimum_deployment_target: str = "iOS16",
          timings: dict | None = None, trim_provenance: bool = True, decompose_quantized: bool = True,
          lean_passes: bool = True, skip_decompositions: bool = True, validate_once: bool = True,
          fast_import: bool = True, delegate_meta: bool = True, fuse_edge: bool = True,
          defer_retraces: bool = True):
    """`to_edge_transform_and_lower(ep, partitioner=[...]).to_executorch()`.

    Returns (ExecutorchProgramManager, {op name: count} outside the delegate). `ep` may also be a dict
    {method name: ExportedProgram}, lowered together into one program with one method each (the
    cascade); the ops outside the delegate are then {method: {op name: count}}. `timings`, when
    given, receives the seconds of each phase (et_lowering.py: decompositions, edge_dialect,
    partitioning, delegate_preprocess, to_executorch). `trim_provenance` (default) keeps only the
    direct parents and the root of FX's per-node provenance while lowering
    (et_lowering.shallow_provenance: byte-identical program, faster lowering). `decompose_quantized`
    (default): the LayerNorm rewrite for XNNPACK also in a quantized (pt2e / torchao) program, so the
    int8 program is one delegate call with no LayerNorm left to the portable kernels
    (benchmarks/profile_mobilevit_xxs_256.md). `lean_passes` (default): XNNPACK's preprocess and the
    ATen -> Edge conversion skip the passes that cannot change this program
    (et_lowering.lean_xnnpack_passes / lean_edge_passes: byte-identical program, faster lowering).
    `skip_decompositions` (default): `run_decompositions` calls that can
    only re-trace the program unchanged are skipped (et_lowering.skip_noop_decompositions: byte-identical).
    `validate_once` (default): the program is verified after the ATen -> Edge conversion and once
    lowered, not after every pass (et_lowering.validate_once). `fast_import` (default): ExecuTorch's
    Edge operator table parsed by libyaml on first import (et_lowering.import_exir). `delegate_meta`
    (default): passes after partitioning take the delegate call's output shapes from its recorded
    metadata instead of re-running the delegated program on fake tensors
    (et_lowering.delegate_outputs_from_meta: byte-identical). `fuse_edge` (default): the ATen -> Edge
    conversion's operator-rewriting passes run as one re-trace when the passes between them cannot act
    (et_lowering.fused_edge_passes: byte-identical). `defer_retraces` (default, with `lean_passes` and
    `validate_once`): two XNNPACK passes' closing re-traces of a float program are left to the next one
    (et_lowering.deferred_xnnpack_retraces: byte-identical).
    """
    import contextlib
    import importlib

    from .et_lowering import (
        PhaseTimer,
        deferred_xnnpack_retraces,
        delegate_outputs_from_meta,
        edge_decomposition_table,
        fused_edge_passes,
        import_exir,
        lean_edge_passes,
        lean_xnnpack_passes,
        shallow_provenance,
        skip_noop_decompositions,
        validate_now,
    )
    from .et_lowering import validate_once as deferred_validation

    timer = PhaseTimer()
    with timer.phase("import"):
        exir = import_exir() if fast_import else importlib.import_module("executorch.exir")
    null = contextlib.nullcontext
    with shallow_provenance() if trim_provenance else null(), lean_xnnpack_passes() if lean_passes else null(), \
            lean_edge_passes() if lean_passes else null(), \
            skip_noop_decompositions() if skip_decompositions else null(), \
            delegate_outputs_from_meta() if delegate_meta else null(), fused_edge_passes() if fuse_edge else null(), \
            deferred_xnnpack_retraces() if defer_retraces else null():
        parts = partitioners(backend, precision, minimum_deployment_target)
        progs = dict(ep) if isinstance(ep, dict) else {"forward": ep}
        with timer.phase("decompositions"):
            if backend == "xnnpack":  # quantized programs too: one delegate call, no portable LayerNorm
                for k, p in progs.items():
                    table = edge_decomposition_table(p, parts) if skip_decompositions else None
                    progs[k] = decompose_for_xnnpack(p, quantized_too=decompose_quantized, edge_table=table)
        with deferred_validation() if validate_once else null(), timer.executorch_phases(parts), \
                timer.phase("to_edge_transform_and_lower"):
            edge = exir.to_edge_transform_and_lower(progs if isinstance(ep, dict) else progs["forward"],
                                                    partitioner=parts)
        if validate_once:
            with timer.phase("validate"):
                for name in edge.methods:
                    validate_now(edge.exported_program(name))
        outside = {k: ops_outside_delegate(edge.exported_program(k)) for k in progs}
        if not isinstance(ep, dict):
            outside = outside["forward"]
        with timer.phase("to_executorch"):
            program = edge.to_executorch()
    if timings is not None:
        s = dict(timer.s)
        inner = sum(s.get(k, 0.0) for k in ("edge_dialect", "partitioning", "delegate_preprocess"))
        s["other_lowering"] = max(0.0, s.pop("to_edge_transform_and_lower") - inner)  # op checks, passes between
        timings.update(s)
    return program, outside


def save(et_program, path: str | os.PathLike) -> Path:
    """Write the `.pte` through a temporary file beside `path` and a rename."""
    from ..checkpoint import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            et_program.write_to_file(f)

    return atomic_write(path, write)


def inspect_pte(path: str | os.PathLike) -> dict:
    """Read a `.pte`: {"methods": [...], "delegates": [backend ids], "operators": [portable ops],
    "delegate_blobs": [(backend id, bytes)]} (blobs are the delegates' payloads)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    data = Path(path).read_bytes()
    try:
        program = deserialize_pte_binary(data).program
    except Exception as e:  # not a .pte, truncated, ...
        raise UserError(f"{path} is not a readable ExecuTorch program: {type(e).__name__}: {e}") from e
    delegates, operators, blobs, methods = [], [], [], []
    for plan in program.execution_plan:
        methods.append(plan.name)
        operators += [op.name + (f".{op.overload}" if op.overload else "") for op in plan.operators]
        for d in plan.delegates:
            delegates.append(d.id)
            blob = None
            if d.processed.location.name == "INLINE" and d.processed.index < len(program.backend_delegate_data):
                blob = program.backend_delegate_data[d.processed.index].data
            blobs.append((d.id, blob))
    return {"methods": methods, "delegates": delegates, "operators": sorted(set(operators)), "delegate_blobs": blobs}


def runtime_backends() -> list[str]:
    """Backends the installed ExecuTorch runtime can execute."""
    from executorch.runtime import Runtime

    return list(Runtime.get().backend_registry.registered_backend_names)


def coreml_delegate_checks(path: str | os.PathLike, deploy_cfg, *, precision: str = "fp16",
                           minimum_deployment_target: str = "iOS16") -> dict:
    """Structural checks of a `.pte` built with the Core ML delegate (what can be checked on Linux).

    The program must consist of Core ML delegate calls only, and each delegate payload must unpack
    to an ML program whose input has the DeployCfg's shape and whose compute precision is the one
    asked for.
    """
    import coremltools as ct
    from executorch.backends.apple.coreml import executorchcoreml

    from .coreml import _fp16, deployment_target

    info = inspect_pte(path)
    _, h, w = deploy_cfg.input_size
    checks = {
        "has_coreml_delegate": "CoreMLBackend" in info["delegates"],
        "only_coreml_delegates": bool(info["delegates"]) and set(info["delegates"]) == {"CoreMLBackend"},
        "no_portable_ops": not info["operators"],
    }
    payload_ok, programs, op_types, fp16_ops, spec_versions = True, 0, {}, 0, set()
    for backend_id, blob in info["delegate_blobs"]:
        if backend_id != "CoreMLBackend":
            continue
        if not blob:
            payload_ok = False
            continue
        tmp = tempfile.mkdtemp(prefix="mvd_coreml_delegate_")
        try:
            if not executorchcoreml.unflatten_directory_contents(blob, tmp):
                payload_ok = False
                continue
            pkg = Path(tmp) / "lowered_module" / "model.mlpackage"
            spec = ct.models.MLModel(str(pkg), skip_model_load=True).get_spec()
            if spec.WhichOneof("Type") != "mlProgram":
                payload_ok = False
                continue
            programs += 1
            spec_versions.add(spec.specificationVersion)
            shapes = [tuple(i.type.multiArrayType.shape) for i in spec.description.input]
            if not any(s[-2:] == (h, w) for s in shapes):
                payload_ok = False
            fn = spec.mlProgram.functions["main"]
            for op in fn.block_specializations[fn.opset].operations:
                op_types[op.type] = op_types.get(op.type, 0) + 1
                if op.type != "const" and any(o.type.tensorType.dataType == _fp16()
                                              for o in op.outputs if o.type.WhichOneof("type") == "tensorType"):
                    fp16_ops += 1
        except Exception:
            payload_ok = False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    checks["delegate_payload_is_ml_program"] = payload_ok and programs == info["delegates"].count("CoreMLBackend")
    checks["precision"] = (fp16_ops > 0) if precision == "fp16" else (fp16_ops == 0)
    checks["deployment_target"] = spec_versions == {deployment_target(minimum_deployment_target).value}
    return {
        "checks": checks,
        "delegates": info["delegates"],
        "portable_ops": info["operators"],
        "op_types": dict(sorted(op_types.items())),
        "fp16_ops": fp16_ops,
    }
