"""The static Neural Engine report of a Core ML program (export/coreml_ane.py): gather / topk ops and
tensors of rank > 4 are listed; the default model's Core ML export is clean and says so in its manifest."""
from __future__ import annotations

import pytest
import torch

from mobilevit_deploy.export.coreml_ane import ane_report

ct = pytest.importorskip("coremltools")


def _convert(module, shape):
    ep = torch.export.export(module.eval(), (torch.randn(*shape),)).run_decompositions({})
    return ct.convert(ep, convert_to="mlprogram", inputs=[ct.TensorType(name="x", shape=shape)],
                      minimum_deployment_target=ct.target.iOS16)


class Clean(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return torch.softmax(self.conv(x).mean((2, 3)), -1)


class Flagged(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.register_buffer("idx", torch.tensor([0, 2, 4]))

    def forward(self, x):
        y = self.conv(x)  # [1, 8, 14, 14]
        y5 = y.reshape(1, 2, 4, 14, 14) * 2.0  # a rank-5 tensor
        g = torch.index_select(y5.reshape(1, 8, 14, 14).mean((2, 3)), 1, self.idx)  # gather
        v, _ = torch.topk(g, 2, dim=1)
        return v


def test_clean_program():
    rep = ane_report(_convert(Clean(), (1, 3, 16, 16)))
    assert rep["clean"] is True and rep["flagged"] == [] and rep["ops_checked"] > 0


def test_flagged_program():
    rep = ane_report(_convert(Flagged(), (1, 3, 16, 16)))
    assert rep["clean"] is False
    rules = {f["rule"] for f in rep["flagged"]}
    assert {"gather", "topk", "rank>4"} <= rules, rep["flagged"]
    assert any(f.get("rank") == 5 for f in rep["flagged"])


@pytest.mark.slow
def test_default_model_coreml_manifest_is_clean(tmp_path):
    from mobilevit_deploy.export import ExportConfig, export_model

    res = export_model("mobilevit_xxs", ExportConfig("coreml", verify=False), out_dir=tmp_path, log=None)
    rep = res.manifest["neural_engine_static"]
    assert rep["clean"] is True and rep["ops_checked"] > 100, rep["flagged"]
