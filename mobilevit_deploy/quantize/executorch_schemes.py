"""ExecuTorch schemes, lowered to the XNNPACK delegate by the export stage.

- `int8` (Int8StaticConfig): torchao pt2e `prepare_pt2e` / `convert_pt2e` with ExecuTorch's
  `XNNPACKQuantizer` and `get_symmetric_quantization_config(is_per_channel=True)`, calibrated on
  real images. Measured facts: 1.54 MB for mobilevit_xxs against 5.2 MB fp32; lowering ~40 s.
- `int8-dynamic` (Int8DynamicConfig): torchao `quantize_(model, Int8DynamicActivationIntxWeightConfig(
  weight_dtype=torch.int8, weight_granularity=PerAxis(0)))` on nn.Linear layers.
"""
from __future__ import annotations

import copy

from ..errors import UserError
from .configs import Int8DynamicConfig, Int8StaticConfig


def xnnpack_quantizer_factory(per_channel: bool = True):
    """`factory(allow)` -> a fresh XNNPACKQuantizer (global symmetric int8 config) with an optional
    node filter (`allow(node) -> bool`, False keeps the op in float)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    def factory(allow=None):
        q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
        if allow is not None:
            q.set_filter_function(allow)
        return q

    return factory


def describe_int8_static(cfg: Int8StaticConfig) -> str:
    return ("torchao pt2e static W8A8 (prepare_pt2e/convert_pt2e) with ExecuTorch XNNPACKQuantizer: int8 symmetric "
            f"{'per-channel' if cfg.per_channel else 'per-tensor'} weights, int8 per-tensor activations (histogram "
            "observer), lowered to XNNPACK")


def apply_int8_dynamic(model, cfg: Int8DynamicConfig):
    """A copy of `model` with its nn.Linear layers quantized by torchao `quantize_` (the original is untouched).

    Returns (module, {"linear_layers": n quantized, "kept_float": [...]}).
    """
    import torch
    from torch import nn
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    from ._pt2e import matches

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"int8-dynamic quantizes nn.Linear layers and {type(model).__name__} has none")
    for p in cfg.keep_float:
        if not any(matches(n, (p,)) for n in names):
            raise UserError(f"--keep-float {p!r} matches no nn.Linear of this model (e.g. {', '.join(names[:5])})")
    if cfg.granularity == "per_group":
        bad = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % cfg.group_size
               and not matches(n, cfg.keep_float)]
        if bad:
            raise UserError(f"group_size {cfg.group_size} does not divide the input width of {', '.join(bad[:4])}"
                            f"{' ...' if len(bad) > 4 else ''}; use per_channel")
        gran = PerGroup(cfg.group_size)
    else:
        gran = PerAxis(0)
    qcfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=gran)
    m = copy.deepcopy(model).eval()
    done = []

    def want(mod, fqn):
        ok = isinstance(mod, nn.Linear) and not matches(fqn, cfg.keep_float)
        if ok:
            done.append(fqn)
        return ok

    quantize_(m, qcfg, filter_fn=want)
    kept = [n for n in names if n not in done]
    return m, {"linear_layers": len(done), "kept_float": kept,
               "method": "torchao quantize_ with Int8DynamicActivationIntxWeightConfig(weight_dtype=int8, "
                         f"weight_granularity={'PerAxis(0)' if cfg.granularity == 'per_channel' else f'PerGroup({cfg.group_size})'}) "
                         "on nn.Linear; dynamic int8 activations; convolutions fp32; lowered to XNNPACK"}
