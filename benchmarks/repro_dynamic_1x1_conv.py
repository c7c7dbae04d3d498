"""Reproduce: dynamic int8 (qd8) 1x1 convolutions lowered to XNNPACK fail at run time with
`XNNExecutor: Propagating input shapes failed ... xnn_status_invalid_parameter` (issue 17), and check
workarounds.

    python -m benchmarks.repro_dynamic_1x1_conv

Each case: a small module, pt2e with `XNNPACKQuantizer` + `get_symmetric_quantization_config(
is_per_channel=True, is_dynamic=True)`, lowered with `mobilevit_deploy.export.executorch.lower`, run once
by the ExecuTorch runtime and compared with the converted PyTorch graph. Prints one line per case:
`<case>: runs; outside delegate ...; max |diff| vs converted graph ...` or `<case>: FAILS: <error>`
(the runtime's own `[XNNExecutor.cpp] Internal Error` log and a short traceback go to stderr).

What fails (executorch 1.5.1): a dynamically quantized conv whose float input is not a placeholder
and is not tagged NHWC by XNNPACK's ChannelsLastTaggedReshapePass -- e.g. the output of a
reshape (view_copy), as after MobileViT's fold (conv_proj). Cause, as read from the pass source
(consistent with the cases below, not traced step by step): the pass's dynamic-quant branch of
`input_to_nhwc` walks `args[0]` all the way up the graph (past the reshape/permutes, to a
placeholder or a cat) and inserts the NCHW->NHWC copy there, so the conv gets NCHW data read as NHWC
(C_in mismatch -> shape propagation fails at run time; a 3-D placeholder at the top of the walk
fails at lowering instead, in ChannelsLastTaggedReshapePass -- seen with [4, 16, 16] tokens -> fold ->
1x1 conv, not a case here). Cases marked "fails" below are expected to print FAILS. Workaround: the
1x1 conv as nn.Linear over channels in NHWC (runs, one delegate); an explicit channels-last copy
before the conv also runs but leaves a `_clone_dim_order` outside the delegate.
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


class ReshapeThen1x1(nn.Module):
    """Minimal failing case: a reshape (4-D -> 4-D, same numel) right before the dynamic 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 1, bias=False)

    def forward(self, x):  # [1, 16, 4, 16]
        return self.conv(x.reshape(1, 16, 8, 8))


def unfold(x, p=2):
    """MobileVitBlock.unfold: [B, C, H, W] -> [B * p * p, N, C] (reshape/permute)."""
    B, C, H, W = x.shape
    nh, nw = H // p, W // p
    x = x.reshape(B, C * nh, p, W).permute(0, 2, 1, 3)
    x = x.reshape(B * p, C, nh * nw, p).permute(0, 3, 2, 1)
    return x.reshape(B * p * p, nh * nw, C)


def fold(x, B, H, W, p=2):
    """MobileVitBlock.fold: [B * p * p, N, C] -> [B, C, H, W] (reshape/permute)."""
    C = x.shape[-1]
    nh, nw = H // p, W // p
    x = x.reshape(B * p, p, nh * nw, C).permute(0, 3, 2, 1)
    x = x.reshape(B, p, C * nh, W).permute(0, 2, 1, 3)
    return x.reshape(B, C, H, W)


class FoldThen1x1(nn.Module):
    """MobileViT's conv_proj position: unfold -> fold -> 1x1 conv (`proj` = conv, or the workaround)."""

    def __init__(self, proj=None):
        super().__init__()
        self.proj = proj if proj is not None else nn.Conv2d(16, 32, 1, bias=False)

    def forward(self, x):  # [1, 16, 8, 8]
        return self.proj(fold(unfold(x), x.shape[0], x.shape[2], x.shape[3]))


class ChannelsLastThen1x1(nn.Module):
    """Candidate workaround: make the conv input an explicit channels-last copy."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x.contiguous(memory_format=torch.channels_last))


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
    # the MobileViT failure (conv_proj after the fold) and its reductions
    x8 = torch.randn(1, 16, 8, 8)
    fc = FoldThen1x1()
    run_case("fails: unfold -> fold -> 1x1 conv (MobileViT conv_proj)", fc, x8)
    run_case("fails (minimal): reshape [1,16,4,16]->[1,16,8,8] -> 1x1 conv", ReshapeThen1x1(),
             torch.randn(1, 16, 4, 16))
    run_case("workaround: unfold -> fold -> 1x1 conv as linear (NHWC)", FoldThen1x1(Linear1x1(fc.proj)), x8)
    run_case("candidate: unfold -> fold -> channels_last copy -> 1x1 conv",
             FoldThen1x1(ChannelsLastThen1x1(fc.proj)), x8)


if __name__ == "__main__":
    main()
