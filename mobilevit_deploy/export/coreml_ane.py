"""A static Neural Engine report of a Core ML ML program: the ops the ANE is known not to run.

Linux has no Core ML runtime, so which compute unit runs each op cannot be asked here
(`MLComputePlan` is macOS-only). What can be read is the converted MIL program in the model spec,
and checked against rules that are known to push an op off the Neural Engine (to the GPU / CPU, with
a copy at each boundary):

- `gather`: the gather family (`gather`, `gather_nd`, `gather_along_axis`) and scatters -- indexed
  memory access, which the ANE does not do;
- `topk`: `topk` / `argsort` (sorting);
- `rank>4`: any tensor of rank above 4 (the ANE's native layout is 4-D; Apple's "Deploying
  Transformers on the Apple Neural Engine" keeps every tensor 4-D for this reason).

The report is conservative in one direction only: a listed op is known to leave the ANE; an
unlisted op is not thereby known to run on it (other limits exist: sizes, dtypes). On a Mac,
`MLComputePlan` gives the real placement.
"""
from __future__ import annotations

__all__ = ["ane_report", "RULES"]

RULES = {
    "gather": ("gather", "gather_nd", "gather_along_axis", "scatter", "scatter_nd", "scatter_along_axis"),
    "topk": ("topk", "argsort"),
}
MAX_RANK = 4


def _tensor_rank(value_type) -> int | None:
    if value_type.WhichOneof("type") != "tensorType":
        return None
    return int(value_type.tensorType.rank)


def _walk(block, found: list, path: str = ""):
    for op in block.operations:
        name = op.outputs[0].name if op.outputs else op.type
        for rule, types in RULES.items():
            if op.type in types:
                found.append({"op": op.type, "name": name, "rule": rule})
        if op.type != "const":
            ranks = [r for r in (_tensor_rank(o.type) for o in op.outputs) if r is not None]
            if ranks and max(ranks) > MAX_RANK:
                found.append({"op": op.type, "name": name, "rule": f"rank>{MAX_RANK}", "rank": max(ranks)})
        for b in op.blocks:  # control flow (cond / while_loop)
            _walk(b, found, path)


def ane_report(spec_or_model) -> dict:
    """{"clean", "flagged": [{op, name, rule[, rank]}], "counts": {rule: n}, "ops_checked", "method"} of an
    ML program (an `MLModel` or its spec). A neural-network (non-ML-program) spec is reported unchecked."""
    spec = spec_or_model.get_spec() if hasattr(spec_or_model, "get_spec") else spec_or_model
    base = {"method": "static: MIL ops of the converted program checked against gather/scatter, topk/argsort and "
                      f"tensor rank > {MAX_RANK} (ops known not to run on the Neural Engine; see "
                      "mobilevit_deploy/export/coreml_ane.py)",
            "rules": {**{k: list(v) for k, v in RULES.items()}, f"rank>{MAX_RANK}": "any non-const op output"}}
    if spec.WhichOneof("Type") == "pipelineClassifier" or spec.WhichOneof("Type") == "pipeline":
        models = list(spec.pipelineClassifier.pipeline.models if spec.WhichOneof("Type") == "pipelineClassifier"
                      else spec.pipeline.models)
    else:
        models = [spec]
    found: list = []
    ops = 0
    programs = 0
    for m in models:
        if m.WhichOneof("Type") != "mlProgram":
            continue
        programs += 1
        for fn in m.mlProgram.functions.values():
            for inp in fn.inputs:
                r = _tensor_rank(inp.type)
                if r is not None and r > MAX_RANK:
                    found.append({"op": "input", "name": inp.name, "rule": f"rank>{MAX_RANK}", "rank": r})
            block = fn.block_specializations[fn.opset]
            ops += sum(1 for o in block.operations if o.type != "const")
            _walk(block, found)
    if not programs:
        return {**base, "clean": None, "flagged": [], "counts": {}, "ops_checked": 0,
                "note": "not an ML program: nothing checked"}
    counts: dict = {}
    for f in found:
        counts[f["rule"]] = counts.get(f["rule"], 0) + 1
    return {**base, "clean": not found, "flagged": found[:50], "counts": counts, "ops_checked": ops}
