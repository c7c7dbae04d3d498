"""Try to reproduce: dynamic int8 (qd8) 1x1 convolutions lowered to XNNPACK fail at run time with
`XNNExecutor: Propagating input shapes failed` (issue 17), and check the workaround (1x1 conv as linear).

    python -m benchmarks.repro_dynamic_1x1_conv

Each case: a small module, pt2e with `XNNPACKQuantizer` + `get_symmetric_quantization_config(
is_per_channel=True, is_dynamic=True)`, lowered with `mobilevit_deploy.export.executorch.lower`, run once
by the ExecuTorch runtime and compared with the converted PyTorch graph. Prints one line per case.
"""
from __future__ import annotations

import sys
import traceback

import torch
from torch import nn


class Conv1x1(nn.Module):
    def __init__(self, cin=16, cout=32):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return self.conv(x)


class Conv3x3Then1x1(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 1, bias=False)

    def forward(self, x):
        return self.b(nn.functional.silu(self.a(x)))


class BNConv1x1(nn.Module):
    """The MobileViT form: 1x1 conv + BatchNorm + SiLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 1, bias=False)
        self.bn = nn.BatchNorm2d(32)

    def forward(self, x):
        return nn.functional.silu(self.bn(self.conv(x)))


class Linear1x1(nn.Module):
    """Workaround: the 1x1 conv written as a linear over channels (NHWC), same weights."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.fc = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.fc.weight.copy_(conv.weight[:, :, 0, 0])
            if conv.bias is not None:
                self.fc.bias.copy_(conv.bias)

    def forward(self, x):
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def run_case(name, m, x):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.runtime import Runtime
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from mobilevit_deploy.export.executorch import lower

    m = m.eval()
    gm = torch.export.export(m, (x,)).module()
    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    prepared = prepare_pt2e(gm, q)
    prepared(x)
    conv = convert_pt2e(prepared)
    ep = torch.export.export(conv, (x,))
    try:
        prog, outside = lower(ep)
        out = Runtime.get().load_program(prog.buffer).load_method("forward").execute([x])[0]
        err = (out - conv(x)).abs().max().item()
        print(f"{name}: runs; outside delegate {outside or 'none'}; max |diff| vs converted graph {err:.3g}",
              flush=True)
    except Exception as e:  # noqa: BLE001 -- the point is to see which case fails and how
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{name}: FAILS: {type(e).__name__}: {msg}", flush=True)
        traceback.print_exc(limit=2, file=sys.stderr)


def main():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 32, 32)
    c = Conv1x1()
    run_case("1x1 conv alone", c, x)
    run_case("3x3 conv -> SiLU -> 1x1 conv", Conv3x3Then1x1(), x)
    run_case("1x1 conv + BN + SiLU", BNConv1x1(), x)
    run_case("workaround: 1x1 conv as linear (NHWC)", Linear1x1(c.conv), x)


if __name__ == "__main__":
    main()
