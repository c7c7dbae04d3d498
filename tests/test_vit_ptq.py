"""ViT-aware PTQ (Liu et al. 2021): the search objective, the ranking loss, the bit allocator, and the
pt2e plumbing that carries the searched steps into convert_pt2e's q/dq nodes."""

import pytest
import torch
from torch import nn

from mobilevit_deploy.errors import UserError
from mobilevit_deploy.quantize.mixed_precision import (
    MixedPrecisionConfig,
    allocate_bits,
    average_bits,
    kmeans_palettize,
    layer_sensitivities,
)
from mobilevit_deploy.quantize.vit_ptq import (
    VitPTQConfig,
    fake_quant,
    pearson,
    ranking_loss,
    search_grid,
    search_step,
)

# ----------------------------------------------------------------------------------------------- math

def test_fake_quant_matches_quantized_decomposed_ops():
    import torchao.quantization.pt2e  # noqa: F401  (registers quantized_decomposed ops)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=g) * 3
    q = torch.ops.quantized_decomposed
    ref = q.dequantize_per_tensor(q.quantize_per_tensor(x, 0.037, 5, -128, 127, torch.int8),
                                  0.037, 5, -128, 127, torch.int8)
    assert torch.equal(fake_quant(x, torch.tensor(0.037), torch.tensor(5), -128, 127), ref)
    s = torch.rand(6, generator=g) * 0.05 + 0.01
    z = torch.zeros(6, dtype=torch.int64)
    refc = q.dequantize_per_channel(q.quantize_per_channel(x, s, z, 1, -127, 127, torch.int8),
                                    s, z, 1, -127, 127, torch.int8)
    assert torch.allclose(fake_quant(x, s, z, -127, 127, axis=1), refc, atol=0, rtol=1e-6)


def test_correlation_objective_picks_exact_step():
    # values on a grid of step s*: quantizing with s* is lossless (pearson exactly 1); a smaller step
    # clips (|k| up to 120 > 127/2), a larger one rounds -- the search must return s* exactly.
    g = torch.Generator().manual_seed(1)
    s_star = 0.0137
    k = torch.randint(-120, 121, (4000,), generator=g).float()
    k[0], k[1] = -120, 120
    x = k * s_star
    minmax_step = x.abs().max() / 127
    steps = ([minmax_step * a for a in (0.5, 0.8, 0.95, 1.0, 1.2)] + [torch.tensor(s_star)]
             + [s_star * 1.01, s_star * 0.99])

    def obj(i):
        return pearson(x, fake_quant(x, steps[i], torch.tensor(0), -127, 127))

    best, scores = search_step(obj, len(steps))
    assert best == 5
    assert scores[5] == pytest.approx(1.0, abs=1e-12)
    assert all(sc < 1 - 1e-7 for i, sc in enumerate(scores) if i != 5)


def test_coarse_to_fine_grid_finds_the_fine_optimum():
    f = lambda i: -(i - 45) ** 2  # noqa: E731 -- unimodal, optimum off the coarse grid
    calls = []
    best, scores = search_grid(lambda i: calls.append(i) or f(i), 57, stride=4, extra=())
    assert best == 45 and len(calls) < 25
    best, _ = search_grid(f, 57, stride=1)
    assert best == 45
    # an extra candidate (the observer's own choice) wins when it is best
    best, _ = search_grid(lambda i: 1.0 if i == 57 else 0.0, 57, stride=4, extra=(57,))
    assert best == 57


def test_pearson_per_channel_and_degenerate():
    a = torch.randn(3, 4, 10)
    b = a * torch.tensor([1.0, -2.0, 0.5, 3.0]).view(1, 4, 1) + 7
    r = pearson(a, b, dim=1)
    assert torch.allclose(r, torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64), atol=1e-12)
    assert float(pearson(torch.ones(10), torch.randn(10))) == 0.0  # constant -> 0, not NaN


def test_ranking_loss_zero_when_order_kept_positive_when_flipped():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(8, 16, generator=g)
    assert float(ranking_loss(ref, ref)) == 0.0
    assert float(ranking_loss(ref, 3 * ref - 1)) == 0.0  # monotone map keeps every order
    assert float(ranking_loss(ref, torch.exp(ref) + 0.1 * ref)) == 0.0
    # a perturbation smaller than half the smallest gap keeps the order as well
    gaps = (ref.unsqueeze(2) - ref.unsqueeze(1)).abs()
    min_gap = gaps[gaps > 0].min()
    noise = (torch.rand(ref.shape, generator=g) - 0.5) * 0.99 * min_gap
    assert float(ranking_loss(ref, ref + noise)) == 0.0
    # swap the largest and smallest score of one row: positive
    flipped = ref.clone()
    i, j = ref[3].argmax(), ref[3].argmin()
    flipped[3, i], flipped[3, j] = ref[3, j], ref[3, i]
    l1 = float(ranking_loss(ref, flipped))
    assert l1 > 0
    # a tiny flip of two adjacent scores costs less than the big swap
    small = ref.clone()
    order = ref[5].argsort()
    a, b = order[7], order[8]
    small[5, a], small[5, b] = ref[5, b], ref[5, a]
    assert 0 < float(ranking_loss(ref, small)) < l1
    # scale-free: scaling both inputs leaves it unchanged
    assert float(ranking_loss(10 * ref, 10 * flipped)) == pytest.approx(l1, rel=1e-6)
    # a margin penalises pairs whose gap shrank below margin * mean gap, even without a flip
    assert float(ranking_loss(ref, 0.01 * ref, margin=0.1)) > 0
    with pytest.raises(UserError):
        ranking_loss(ref, ref[:, :4])


def test_config_validation():
    VitPTQConfig()
    for bad in (dict(alpha_range=(1.2, 0.5)), dict(n_candidates=1), dict(rounds=0), dict(weight_granularity="row"),
                dict(ranking_gamma=-1), dict(search_images=0), dict(layer_kinds=("conv", "attention"))):
        with pytest.raises(UserError):
            VitPTQConfig(**bad)
    with pytest.raises(UserError):
        MixedPrecisionConfig(budget_avg_bits=3.0)
    with pytest.raises(UserError):
        MixedPrecisionConfig(choices=(4, 5))


# ------------------------------------------------------------------------------------ bit allocation

def test_allocator_meets_budget_and_prefers_sensitive_layer():
    sizes = {"a": 1000, "b": 1000}
    bits = allocate_bits({"a": 10.0, "b": 1.0}, sizes, 7.0, choices=(4, 6, 8))
    assert average_bits(bits, sizes) <= 7.0
    assert bits == {"a": 8, "b": 6}
    bits = allocate_bits({"a": 1.0, "b": 10.0}, sizes, 7.0, choices=(4, 6, 8))
    assert bits == {"a": 6, "b": 8}
    # the budget is a hard limit, even when it cannot be met exactly
    assert allocate_bits({"a": 10.0, "b": 1.0}, sizes, 6.9) == {"a": 8, "b": 4} or \
        average_bits(allocate_bits({"a": 10.0, "b": 1.0}, sizes, 6.9), sizes) <= 6.9
    assert allocate_bits({"a": 1.0, "b": 1.0}, sizes, 8.0) == {"a": 8, "b": 8}
    assert allocate_bits({"a": 1.0, "b": 1.0}, sizes, 4.0) == {"a": 4, "b": 4}
    with pytest.raises(UserError):
        allocate_bits({"a": 1.0, "b": 1.0}, sizes, 3.5)
    with pytest.raises(UserError):
        allocate_bits({"a": 1.0}, sizes, 6.0)


def test_allocator_many_layers_budget_and_optimality():
    g = torch.Generator().manual_seed(3)
    n = 12
    sizes = {f"l{i}": int(s) for i, s in enumerate(torch.randint(100, 5000, (n,), generator=g))}
    sens = {k: float(v) for k, v in zip(sizes, torch.rand(n, generator=g) * 100)}
    for budget in (4.5, 5.0, 6.0, 7.3):
        bits = allocate_bits(sens, sizes, budget)
        assert average_bits(bits, sizes) <= budget + 1e-12
        # exhaustive check on the 3^12 allocations is too slow; compare against a greedy baseline
        obj = sum(sens[k] * 4.0 ** -bits[k] for k in sizes)
        greedy = {k: 4 for k in sizes}
        while True:
            best = None
            for k in sizes:
                if greedy[k] < 8:
                    trial = dict(greedy, **{k: greedy[k] + 2})
                    if average_bits(trial, sizes) <= budget:
                        gain = sens[k] * (4.0 ** -greedy[k] - 4.0 ** -trial[k]) / (2 * sizes[k])
                        if best is None or gain > best[0]:
                            best = (gain, k)
            if best is None:
                break
            greedy[best[1]] += 2
        assert obj <= sum(sens[k] * 4.0 ** -greedy[k] for k in sizes) * (1 + 1e-9)


def test_allocator_uses_measured_errors():
    sizes = {"a": 100, "b": 100}
    # equal sensitivities; layer b loses far more at 4 bits -> b gets the bits
    errors = {"a": {4: 0.01, 8: 0.0}, "b": {4: 0.5, 8: 0.0}}
    assert allocate_bits({"a": 1.0, "b": 1.0}, sizes, 6.0, choices=(4, 8), errors=errors) == {"a": 4, "b": 8}


def test_kmeans_palettize_lut_size_and_error_order():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(4))
    errs = []
    for b in (2, 4, 6):
        lut, idx, w_hat = kmeans_palettize(w, b)
        assert lut.numel() <= 2 ** b and w_hat.shape == w.shape
        assert torch.equal(w_hat.reshape(-1), lut[idx])
        errs.append(float((w - w_hat).pow(2).mean()))
    assert errs[0] > errs[1] > errs[2]


def test_sensitivities_use_attention_map_for_attention_layers():
    from mobilevit_deploy.models.layers import TransformerBlock

    torch.manual_seed(0)
    blk = nn.Sequential(nn.Linear(8, 16), TransformerBlock(16, num_heads=2, mlp_ratio=2.0)).eval()
    x = torch.randn(4, 10, 8)
    sens = layer_sensitivities(blk, [x])
    assert set(sens) == {"0.weight", "1.attn.qkv.weight", "1.attn.proj.weight", "1.mlp.fc1.weight", "1.mlp.fc2.weight"}
    # attention layers share the attention map's nuclear norm; a row-stochastic [10, 10] map has
    # nuclear norm >= 1 (its spectral norm is >= 1) and <= sqrt(10) * ||A||_F <= 10
    assert sens["1.attn.qkv.weight"] == sens["1.attn.proj.weight"]
    assert 1.0 <= sens["1.attn.qkv.weight"] <= 10.0
    with torch.no_grad():
        o = blk[0](x)
    assert sens["0.weight"] == pytest.approx(float(torch.linalg.matrix_norm(o, ord="nuc").mean()), rel=1e-5)


# ------------------------------------------------------------------------------ pt2e graph plumbing

class _Tiny(nn.Module):
    """conv -> tokens -> the project's Attention (qkv linear without bias, bmm, softmax, bmm, proj)."""

    def __init__(self):
        super().__init__()
        from mobilevit_deploy.models.layers import Attention

        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = Attention(8, num_heads=2)

    def forward(self, x):
        y = self.conv(x).flatten(2).transpose(1, 2)  # [B, 16, 8]
        return self.attn(y).mean(1)


def _prepared(model, x):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    ep = torch.export.export(model, (x,))
    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    p = prepare_pt2e(ep.module(), q)
    p(x)
    return p


def _qdq_scales(converted):
    """Scales of the quantize_per_tensor nodes, keyed by the name of the node they quantize."""
    out = {}
    for n in converted.graph.nodes:
        if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target):
            out[n.args[0].name] = float(n.args[1])
    return out


@pytest.fixture(scope="module")
def tiny_setup():
    pytest.importorskip("executorch")
    torch.manual_seed(0)
    model = _Tiny().eval()
    # images whose first-layer input sits on a grid of step s* (so s* is a known optimum for the
    # input observer): int8 affine, range [-120 s*, 120 s*] -> min/max step 240 s* / 255
    s_star = 0.01
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-120, 121, (8, 3, 4, 4), generator=g).float() * s_star
    x[0, 0, 0, 0], x[0, 0, 0, 1] = -120 * s_star, 120 * s_star
    return model, x, s_star


def test_searched_scales_reach_convert_pt2e(tiny_setup):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from mobilevit_deploy.quantize.vit_ptq import apply_vit_calibration, find_quant_layers, simulate_converted

    model, x, s_star = tiny_setup
    p = _prepared(model, x)
    layers = find_quant_layers(p)
    kinds = [L.kind for L in layers]
    assert kinds.count("conv") == 1 and kinds.count("linear") == 2 and kinds.count("matmul") >= 1
    assert any(L.attention_scores for L in layers)
    # bad input is refused before anything is modified
    with pytest.raises(UserError):
        apply_vit_calibration(model, [x])  # not a prepared GraphModule
    with pytest.raises(UserError):
        apply_vit_calibration(p, [])
    with pytest.raises(UserError):
        apply_vit_calibration(p, [x * float("nan")])
    with pytest.raises(UserError):
        apply_vit_calibration(p, [x], cfg={"rounds": 2})
    x_obs = next(n for n in p.graph.nodes if n.op == "call_module" and n.args and getattr(n.args[0], "name", "") == "x")
    base_x_scale = float(p.get_submodule(x_obs.target).calculate_qparams()[0])
    # grid containing alpha = 255/240 = 1.0625 exactly: linspace(1.0, 1.125, 11) has step 0.0125
    cfg = VitPTQConfig(alpha_range=(1.0, 1.125), n_candidates=11, coarse_stride=1, rounds=2, search_images=8,
                       bias_correction=True)
    apply_vit_calibration(p, [x], cfg)
    rep = p.meta["vit_ptq"]
    assert rep["n_layers"] == len(layers) and rep["n_observers_replaced"] > 0
    conv_entry = next(e for e in rep["layers"] if e["kind"] == "conv")
    # the attention-score bmm searches both operands (q*scale and k^T; k's observer is shared with
    # the qkv output and the v slice, so the attn@v bmm finds nothing left to search)
    scores_entry = next(e for e in rep["layers"] if e["attention_scores"])
    assert set(scores_entry["searched"]) == {"act0", "act1"}
    av_entry = next(e for e in rep["layers"] if e["kind"] == "matmul" and not e["attention_scores"])
    assert av_entry["searched"] == {}
    assert conv_entry["searched"]["act0"] == pytest.approx(255 / 240, abs=1e-4)
    assert conv_entry["objective_vit"] >= conv_entry["objective_observer"] - 1e-9
    for e in rep["layers"]:  # the observer's own choice is a candidate: the search never loses
        assert e["objective_vit"] >= e["objective_observer"] - 1e-9
    # the linear without bias got a bias parameter (bias correction)
    assert any(name.startswith("_vit_ptq_bias_") for name, _ in p.named_parameters())
    # the sequential search simulates the converted model exactly (same q/dq at every observer)
    sim = simulate_converted(p, x)
    w_obs = next(n for n in p.graph.nodes
                 if n.op == "call_module" and getattr(n.args[0], "target", "") == "conv.weight")
    searched = p.get_submodule(w_obs.target)
    assert type(searched).__name__ == "SearchedQParamsObserver"
    conv = convert_pt2e(p)
    scales = _qdq_scales(conv)
    assert scales["x"] == pytest.approx(s_star, rel=1e-5)  # the input quantize node holds s*
    assert base_x_scale != pytest.approx(s_star, rel=1e-3)  # the default (histogram) observer did not find it
    # the conv weight's per-channel scales in the converted graph are the searched ones
    # the conv weight's per-channel scales in the converted graph are the searched observer's
    conv_node = next(n for n in conv.graph.nodes if "conv2d" in str(n.target))
    dq = conv_node.args[1]
    assert "dequantize_per_channel" in str(dq.target)
    dq_scale = dq.args[1]
    dq_scale = conv.get_buffer(dq_scale.target) if hasattr(dq_scale, "target") else dq_scale
    assert torch.allclose(dq_scale.float(), searched.scale, rtol=0, atol=0)
    with torch.no_grad():
        yq, yf = conv(x), model(x)
    assert torch.isfinite(yq).all() and yq.shape == yf.shape
    assert torch.allclose(sim, yq, atol=1e-5, rtol=1e-4)
