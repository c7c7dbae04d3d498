"""ONNX: ExportedProgram -> `.onnx` (torch.onnx dynamo exporter), simplified with onnxsim.

The dynamo exporter takes the same ExportedProgram as the other targets (one capture). Input
"image" [1, 3, H, W] (normalised float32), output "logits" [1, C].
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

DEFAULT_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def convert(ep, deploy_cfg, *, opset: int = DEFAULT_OPSET, simplify: bool = True):
    """Return (onnx.ModelProto, info) for an ExportedProgram; `info` has node counts and op types."""
    import onnx
    import torch

    if opset < 17:
        raise UserError(f"ONNX opset {opset} is too old (17 or newer: LayerNormalization)")
    onnx_program = torch.onnx.export(
        ep, (deploy_cfg.example_input(),), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamo=True, opset_version=opset, verbose=False,
    )
    model = onnx_program.model_proto
    info = {"opset": opset, "nodes_exported": len(model.graph.node)}
    if simplify:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim could not validate the simplified model against the exported one")
        model = simplified
    onnx.checker.check_model(model)
    info["nodes"] = len(model.graph.node)
    info["simplified"] = bool(simplify)
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    info["op_types"] = dict(sorted(ops.items()))
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise RuntimeError(f"exported ONNX graph has inputs/outputs {names}, "
                           f"expected ([{INPUT_NAME!r}], [{OUTPUT_NAME!r}])")
    return model, info


def save(model, path: str | os.PathLike) -> Path:
    """Write the ModelProto through a temporary file beside `path` and a rename."""
    import onnx

    from ..checkpoint import atomic_write

    return atomic_write(path, lambda tmp: onnx.save_model(model, tmp))
