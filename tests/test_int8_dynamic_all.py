"""`int8-dynamic-all`: dynamic int8 on every conv and linear. MobileViT's `conv_proj` (a 1x1 conv right after
the fold's reshape) fails in XNNPACK as a dynamic conv, so it is rewritten as a linear over channels first:
these tests check the rewrite keeps the function and that the MobileViT program then lowers into one delegate
call and runs."""
from __future__ import annotations

import pytest
import torch

from mobilevit_deploy.errors import UserError
from mobilevit_deploy.quantize import get_config


@pytest.mark.parametrize("hw", [(5, 7), (1, 1)])  # 1x1 pixel: the 2-D linear form (lowers at 32 px)
def test_channel_linear_is_the_1x1_conv_norm_act_it_replaces(hw):
    from mobilevit_deploy.models.layers import ChannelLinearNormAct, ConvNormAct

    torch.manual_seed(0)
    cna = ConvNormAct(16, 24, 1).eval()
    with torch.no_grad():
        cna.bn.running_mean.uniform_(-0.5, 0.5)
        cna.bn.running_var.uniform_(0.5, 2.0)
        cna.bn.weight.uniform_(0.5, 1.5)
        cna.bn.bias.uniform_(-0.2, 0.2)
    lin = ChannelLinearNormAct.from_conv_norm_act(cna)
    x = torch.randn(2, 16, *hw)
    torch.testing.assert_close(lin(x), cna(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a dense 1x1"):
        ChannelLinearNormAct.from_conv_norm_act(ConvNormAct(16, 16, 3).eval())


def test_mobilevit_proj_convs_are_replaced_and_the_model_is_unchanged():
    from mobilevit_deploy.models import create_model
    from mobilevit_deploy.models.layers import ChannelLinearNormAct
    from mobilevit_deploy.quantize.executorch_schemes import proj_convs_as_linear

    m = create_model("mobilevit_xxs").eval()
    import copy

    m2 = copy.deepcopy(m)
    done = proj_convs_as_linear(m2)
    assert done == ["stages.2.1.conv_proj", "stages.3.1.conv_proj", "stages.4.1.conv_proj"]
    assert all(isinstance(m2.get_submodule(n), ChannelLinearNormAct) for n in done)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x), rtol=1e-4, atol=1e-4)


def test_config_variants_and_bad_values():
    c = get_config("executorch", "int8-dynamic-all")
    assert c.scheme == "int8-dynamic-all" and c.layers == "all"
    assert get_config("executorch", "int8-dynamic").scheme == "int8-dynamic"
    with pytest.raises(UserError, match="layers must be linear or all"):
        get_config("executorch", "int8-dynamic", layers="convs")
    with pytest.raises(UserError, match="per output channel only"):
        get_config("executorch", "int8-dynamic-all", granularity="per_group")


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 32])
def test_mobilevit_int8_dynamic_all_lowers_to_one_delegate_and_runs(tmp_path, size):
    """Without the rewrite this program fails at run time (XNNExecutor: Propagating input shapes failed).
    At 32 px the last stage is 1x1 pixel: as an NHWC linear its input got a layout copy and the lowering
    failed ("Weight and Input should both be quantized"); the 2-D linear form lowers."""
    import json

    from mobilevit_deploy.export import ModelSource, export_model
    from mobilevit_deploy.runtime import load_artifact

    res = export_model(ModelSource("mobilevit_xxs"), {"target": "executorch", "quant": "int8-dynamic-all",
                                                     "size": size}, out_dir=tmp_path, log=None)
    m = json.loads(res.manifest_path.read_text())
    q = m["quantization"]
    assert m["ops_not_delegated"] == [] and m["verification"]["passed"]
    assert len(q["replaced_convs"]) == 3 and q["keep_float"]["units"] == []
    assert q["accuracy"]["sqnr_db"] > 20 and q["size_ratio_fp32"] < 0.35
    out = load_artifact(res.artifact)(torch.zeros(1, 3, size, size))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
