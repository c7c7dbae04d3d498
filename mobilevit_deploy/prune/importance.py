"""Importance of every unit of every prunable group: `score(model, method, batches) -> {group id: [units]}`.

Methods (higher = more important; the budget removes the lowest score per unit of cost first):

- `taylor` (default): first-order Taylor |w * dL/dw| summed over the weights a unit owns, summed over
  the calibration batches (cross-entropy on real labelled images, model in eval mode). Molchanov et
  al. 2019; an estimate of the loss change, so it is compared across kinds as it is.
- `magnitude`: L1 of the weights a unit owns (data-free), divided by the mean of its group, so every
  group is on the same scale (L1 of a layer and of a channel are not comparable otherwise).
- `nvit`: NViT-style (Yang et al. 2023) global Hessian-aware saliency: per batch the group-wise
  second-order Taylor term (sum over the unit's weights of w * dL/dw)^2 -- the Fisher approximation
  of the Hessian -- summed over batches, then normalised per structure kind (`global_scores`) so the
  kinds share one global scale; allocated by cost (MACs, or the measured latency table with
  --target-latency).
- `slim`: ViT-Slim-style (Chavan et al. 2022) soft masks, one learnable scalar per attention head, MLP
  hidden unit, transformer width channel (shared by the whole block, as ViT-Slim's embedding mask),
  MV2 expansion channel, and a gate per transformer layer; weights frozen, masks trained for
  `steps` steps on KL(unpruned || masked) + `l1` * sum over mask tensors of mean |m|. Score = |m|.
- `vtp`: VTP-style (Zhu et al. 2021) gates on feature dimensions with L1, as `slim` but one gate per
  attention inner dimension (a head scores the mean |gate| of its dimensions) and no depth gates.
- `wd`: WDPruning-style (Yu et al. AAAI 2022). Width: learnable saliency masks on heads, MLP hidden
  units, transformer width and MV2 channels, trained as `slim`'s (weights frozen, KL to the unpruned
  model + L1). Depth: a shallow classifier (LayerNorm without affine + Linear on the token-averaged
  output) after every transformer layer of every MobileViT block, trained on 3/4 of the calibration
  images (weights frozen); the trailing layers after the earliest layer whose classifier is within
  `depth_tol` points of the block's last layer on the held-out 1/4 are marked droppable (scored ~0,
  removed first, last layer first); the others score high (removed only if the budget cannot be met
  otherwise, again trailing first). Score = |mask| (x unit cost).
- `spvit`: SPViT-style (Pan et al.). Single path per transformer layer: out = g attn(x) + (1 - g)
  conv(x), conv a ConvAttention whose weights are indexed from the attention's (v rows of qkv, proj,
  a depthwise kernel from a learned softmax mapping of kernel positions to heads), g = sigmoid(gate);
  plus soft masks on MLP hidden units (and, as MobileViT's MACs are mostly its MV2 blocks, on MV2
  expansion channels). Weights frozen; gates, mapping and masks trained on KL + `l1` x (mean |mask| +
  mean g). Scores: g per layer (`attn_conv`, low g -> the layer's attention becomes a convolution,
  with the learned mapping stored on the attention as `_spvit_map` for surgery), |mask| per unit.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .modules import head_kernels, is_conv_attention
from .structures import ALL_KINDS, KINDS, Group, coupled_tensors, couplings, groups, layer_modules

METHODS = ("taylor", "magnitude", "slim", "vtp", "nvit", "wd", "spvit")
IMPLEMENTED = METHODS
NEEDS_DATA = ("taylor", "slim", "vtp", "nvit", "wd", "spvit")
METHOD_KINDS = {"taylor": KINDS, "magnitude": KINDS, "nvit": KINDS, "slim": KINDS, "wd": KINDS,
                "vtp": ("mv2_hidden", "vit_width", "heads", "mlp_hidden", "ffn_hidden"),
                "spvit": ("mv2_hidden", "mlp_hidden", "attn_conv", "ffn_hidden")}
CALIB_BATCHES_MIN = {"wd": 16}  # wd trains shallow classifiers on the calibration images: at least 512


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r} (choose from: {', '.join(METHODS)})")
    if method not in IMPLEMENTED:
        raise UserError(f"method {method!r} is not implemented yet (implemented: {', '.join(IMPLEMENTED)})")


# --------------------------------------------------------------------------- per-unit reduction
def unit_sums(model: nn.Module, group: Group, value: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.Tensor:
    """Per unit of `group`: the sum of `value(param)` (same shape as param) over the slices the unit owns."""
    out = torch.zeros(group.size, dtype=torch.float64)
    if group.kind == "layers":
        for i, layer in enumerate(layer_modules(model, group)):
            for p in layer.parameters():
                v = value(p)
                if v is not None:
                    out[i] += float(v.double().sum())
        return out
    for c in couplings(model, group):
        for t, axis in coupled_tensors(c):
            v = value(t)
            if v is None:
                continue
            v = v.detach().double()
            per_index = v.sum(dim=[d for d in range(v.dim()) if d != axis]) if v.dim() > 1 else v
            out.index_add_(0, c.unit_of, per_index)
    return out



def _scoring_mode(model: nn.Module, *, requires_grad: bool):
    """Put `model` in eval mode with every parameter's requires_grad set to `requires_grad`; returns the
    function that restores both (call it in a `finally`)."""
    was, req = model.training, {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(requires_grad)

    def restore():
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was)
    return restore


def _grad_scores(model: nn.Module, batches, gs: list[Group], second_order: bool, log) -> dict[str, torch.Tensor]:
    scores = {g.id: torch.zeros(g.size, dtype=torch.float64) for g in gs}
    restore = _scoring_mode(model, requires_grad=True)  # eval (BatchNorm keeps its statistics)
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if second_order:
                def val(p):
                    return None if p.grad is None else p.detach() * p.grad
            else:
                def val(p):
                    return None if p.grad is None else (p.detach() * p.grad).abs()
            for g in gs:
                s = unit_sums(model, g, val)
                scores[g.id] += s.pow(2) if second_order else s
    finally:
        model.zero_grad(set_to_none=True)
        restore()
    return scores


def _per_group_normalised(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v / v.mean().clamp_min(1e-30) for k, v in scores.items()}


def _kind_means(values: dict[str, torch.Tensor]) -> dict[str, float]:
    by_kind: dict[str, list[torch.Tensor]] = {}
    for gid, v in values.items():
        by_kind.setdefault(gid.split(":")[0], []).append(v.flatten().double())
    return {k: max(float(torch.cat(vs).mean()), 1e-30) for k, vs in by_kind.items()}


def global_scores(method: str, scores: dict[str, torch.Tensor], unit_cost: dict[str, float]) -> dict[str, torch.Tensor]:
    """Scores on one global scale, for the budget's importance / cost ranking.

    `unit_cost` is what removing one unit of a group saves in the unpruned model (MACs or latency).
    - taylor: as is (an estimate of the loss change, comparable across kinds).
    - magnitude, slim, vtp: score x unit cost, so importance / cost ranks by the relative magnitude or
      the mask value itself -- a global threshold on (normalised) magnitudes / masks as ViT-Slim's
      global mask ranking -- and a whole layer competes with one channel on equal terms.
    - nvit: divided by the mean of its structure kind (one global saliency normalised across kinds),
      times the kind's mean unit cost, so the allocation trades saliency against each unit's own cost.
    """
    if method == "taylor":
        return scores
    if method in ("magnitude", "slim", "vtp", "wd", "spvit"):
        return {gid: v * unit_cost[gid] for gid, v in scores.items()}
    mean_s = _kind_means(scores)
    mean_c = _kind_means({gid: torch.tensor([unit_cost[gid]]) for gid in scores})
    return {gid: v / mean_s[gid.split(":")[0]] * mean_c[gid.split(":")[0]] for gid, v in scores.items()}


# ------------------------------------------------------------------------------ soft masks / gates
class _Gates:
    """Learnable multiplicative masks attached with hooks (removed by `close`)."""

    def __init__(self, model: nn.Module, gs: list[Group], per_dim_heads: bool):
        self.params: dict[str, nn.Parameter] = {}
        self.handles = []
        self.head_dim: dict[str, int] = {}
        for g in gs:
            mod = model.get_submodule(g.path)
            if g.kind == "mv2_hidden":
                gate = self._new(g.id, g.size)
                self._pre(mod.conv3_1x1.conv, lambda x, gate=gate: x * gate.view(1, -1, 1, 1))
            elif g.kind == "ffn_hidden":
                gate = self._new(g.id, g.size)
                self._pre(mod.conv2[0], lambda x, gate=gate: x * gate.view(1, -1, 1, 1))
            elif g.kind == "mlp_hidden":
                gate = self._new(g.id, g.size)
                self._pre(mod.fc2, lambda x, gate=gate: x * gate)
            elif g.kind == "heads":
                e = mod.head_dim
                self.head_dim[g.id] = e
                if per_dim_heads:
                    gate = self._new(g.id, g.size * e)
                    self._pre(mod.proj, lambda x, gate=gate: x * gate)
                else:
                    gate = self._new(g.id, g.size)
                    self._pre(mod.proj, lambda x, gate=gate, e=e: x * gate.repeat_interleave(e))
            elif g.kind == "vit_width":
                gate = self._new(g.id, g.size)
                self._post(mod.conv_1x1, lambda y, gate=gate: y * gate.view(1, -1, 1, 1))
                for layer in mod.transformer:
                    self._post(layer.attn.proj, lambda y, gate=gate: y * gate)
                    self._post(layer.mlp.fc2, lambda y, gate=gate: y * gate)
                self._post(mod.norm, lambda y, gate=gate: y * gate)
            elif g.kind == "layers":
                gate = self._new(g.id, g.size)
                for i, layer in enumerate(mod.transformer):
                    self._post(layer.attn, lambda y, gate=gate, i=i: y * gate[i])
                    self._post(layer.mlp, lambda y, gate=gate, i=i: y * gate[i])

    def _new(self, gid: str, n: int) -> nn.Parameter:
        p = nn.Parameter(torch.ones(n))
        self.params[gid] = p
        return p

    def _pre(self, mod, fn):
        self.handles.append(mod.register_forward_pre_hook(lambda m, args: (fn(args[0]),) + tuple(args[1:])))

    def _post(self, mod, fn):
        self.handles.append(mod.register_forward_hook(lambda m, args, out: fn(out)))

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _gate_scores(model: nn.Module, batches, gs: list[Group], *, per_dim_heads: bool, steps: int, l1: float,
                 lr: float, log) -> dict[str, torch.Tensor]:
    restore = _scoring_mode(model, requires_grad=False)  # eval (BatchNorm keeps its statistics)
    with torch.no_grad():
        targets = [F.log_softmax(model(x), dim=-1) for x, _ in batches]  # the unpruned model's outputs
    gates = _Gates(model, gs, per_dim_heads)
    try:
        opt = torch.optim.Adam(list(gates.params.values()), lr=lr)
        for step in range(steps):
            i = step % len(batches)
            x = batches[i][0]
            logp = F.log_softmax(model(x), dim=-1)
            kd = F.kl_div(logp, targets[i], reduction="batchmean", log_target=True)
            reg = sum(p.abs().mean() for p in gates.params.values())
            loss = kd + l1 * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log and (step + 1 == steps or (step + 1) % max(1, steps // 4) == 0):
                log(f"  soft masks step {step + 1}/{steps}: KD {kd.item():.4f}, mean |mask| "
                    f"{torch.cat([p.detach().abs().flatten() for p in gates.params.values()]).mean().item():.3f}")
        scores = {}
        for g in gs:
            v = gates.params[g.id].detach().abs().double()
            if g.kind == "heads" and per_dim_heads:
                v = v.view(g.size, -1).mean(1)
            scores[g.id] = v
        return scores
    finally:
        gates.close()
        restore()


# ------------------------------------------------------------------------------- wd: depth probes
def _depth_probe_scores(model: nn.Module, batches, gs: list[Group], tol: float, log,
                        probe_steps: int = 150) -> dict[str, torch.Tensor]:
    """WDPruning's depth: shallow classifiers after every transformer layer (see the module docstring).
    Returns {layers group id: [score per layer]}."""
    feats: dict[str, list[list[torch.Tensor]]] = {g.id: [[] for _ in range(g.size)] for g in gs}
    handles = []
    bsz = {"B": 0}
    for g in gs:
        for i, layer in enumerate(layer_modules(model, g)):
            def hook(mod, args, out, gid=g.id, i=i):
                t = out.reshape(bsz["B"], -1, out.shape[-1]).mean(1)  # [B, d]: tokens of the image averaged
                feats[gid][i].append(F.layer_norm(t, t.shape[-1:]))
            handles.append(layer.register_forward_hook(hook))
    was = model.training
    model.eval()
    ys = []
    try:
        with torch.no_grad():
            for x, y in batches:
                bsz["B"] = x.shape[0]
                model(x)
                ys.append(y)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    y = torch.cat(ys)
    n_tr = max(1, (3 * len(y)) // 4) if len(y) > 1 else 1
    n_cls = int(getattr(model, "num_classes", int(y.max()) + 1))
    out = {}
    for g in gs:
        accs = []
        for i in range(g.size):
            X = torch.cat(feats[g.id][i])
            torch.manual_seed(0)
            probe = nn.Linear(X.shape[1], n_cls)
            opt = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-3)
            for _ in range(probe_steps):
                loss = F.cross_entropy(probe(X[:n_tr]), y[:n_tr])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            Xh, yh = (X[n_tr:], y[n_tr:]) if len(y) > n_tr else (X, y)
            with torch.no_grad():
                accs.append(100.0 * float((probe(Xh).argmax(1) == yh).float().mean()))
        keep = next(i for i, a in enumerate(accs) if a >= accs[-1] - tol)  # the earliest good-enough exit
        n = g.size
        out[g.id] = torch.tensor([(n - j) * (1e6 if j <= keep else 1e-6) for j in range(n)], dtype=torch.float64)
        if log:
            log(f"  depth probes {g.path}: held-out top-1 per layer "
                f"[{', '.join(f'{a:.1f}' for a in accs)}] % -> layers {keep + 1}..{n - 1} droppable"
                if keep + 1 < n else f"  depth probes {g.path}: held-out top-1 per layer "
                f"[{', '.join(f'{a:.1f}' for a in accs)}] % -> keep all {n}")
    return out


# ---------------------------------------------------------------------- spvit: single-path gates
def _spvit_scores(model: nn.Module, batches, gs: list[Group], *, steps: int, l1: float, lr: float,
                  log) -> dict[str, torch.Tensor]:
    """SPViT (see the module docstring): per-layer attention-vs-conv gates and the head-to-position
    mapping, with soft masks on MLP hidden / MV2 channels. Leaves `_spvit_map` on each attention."""
    k = 3
    restore = _scoring_mode(model, requires_grad=False)  # eval (BatchNorm keeps its statistics)
    with torch.no_grad():
        targets = [F.log_softmax(model(x), dim=-1) for x, _ in batches]
    masks = _Gates(model, [g for g in gs if g.kind != "attn_conv"], per_dim_heads=False)
    conv_groups = [g for g in gs if g.kind == "attn_conv"]
    gate, mapping, handles, attn_of = {}, {}, [], {}
    torch.manual_seed(0)
    for g in conv_groups:
        gate[g.id] = nn.Parameter(torch.full((g.size,), 2.0))  # sigmoid(2) = 0.88: start near attention
        for i, layer in enumerate(layer_modules(model, g)):
            attn = layer.attn
            if is_conv_attention(attn):
                continue
            key = f"{g.id}:{i}"
            mapping[key] = nn.Parameter(0.1 * torch.randn(k * k, attn.num_heads))
            attn_of[key] = attn

            def hook(mod, args, out, gid=g.id, i=i, key=key):
                x = args[0]
                B, N, _ = x.shape
                s = int(round(N ** 0.5))
                h, e = mod.num_heads, mod.head_dim
                inner = h * e
                v = F.linear(x, mod.qkv.weight[2 * inner:3 * inner],
                             None if mod.qkv.bias is None else mod.qkv.bias[2 * inner:3 * inner])
                w = head_kernels(mapping[key].softmax(dim=1), e, k)
                v = F.conv2d(v.transpose(1, 2).reshape(B, inner, s, s), w, padding=k // 2, groups=inner)
                conv = mod.proj(v.reshape(B, inner, N).transpose(1, 2))
                a = torch.sigmoid(gate[gid][i])
                return a * out + (1 - a) * conv
            handles.append(attn.register_forward_hook(hook))
    try:
        params = list(masks.params.values()) + list(gate.values()) + list(mapping.values())
        opt = torch.optim.Adam(params, lr=lr)
        for step in range(steps):
            i = step % len(batches)
            logp = F.log_softmax(model(batches[i][0]), dim=-1)
            kd = F.kl_div(logp, targets[i], reduction="batchmean", log_target=True)
            reg = sum(p.abs().mean() for p in masks.params.values())
            if gate:
                reg = reg + torch.cat([torch.sigmoid(v) for v in gate.values()]).mean()
            loss = kd + l1 * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log and (step + 1 == steps or (step + 1) % max(1, steps // 4) == 0):
                gs_ = torch.cat([torch.sigmoid(v.detach()) for v in gate.values()]) if gate else torch.zeros(1)
                log(f"  spvit step {step + 1}/{steps}: KD {kd.item():.4f}, attention gates "
                    f"[{', '.join(f'{v:.2f}' for v in gs_.tolist())}]")
        scores = {}
        for g in gs:
            if g.kind == "attn_conv":
                v = torch.sigmoid(gate[g.id].detach()).double()
                for i, layer in enumerate(layer_modules(model, g)):
                    if is_conv_attention(layer.attn):
                        v[i] = 1e9  # already a convolution: nothing left to convert
                scores[g.id] = v
            else:
                scores[g.id] = masks.params[g.id].detach().abs().double()
        for key, attn in attn_of.items():
            attn._spvit_map = mapping[key].detach().softmax(dim=1).clone()
        return scores
    finally:
        masks.close()
        for h in handles:
            h.remove()
        restore()


# ------------------------------------------------------------------------------------- entry point
def score(model: nn.Module, method: str, batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), *,
          steps: int = 30, l1: float = 0.5, lr: float = 0.02, depth_tol: float = 1.0,
          log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """{group id: importance per unit (float64, >= 0)} for the groups `method` scores."""
    check_method(method)
    gs = [g for g in groups(model, ALL_KINDS) if g.kind in METHOD_KINDS[method]]
    if method in NEEDS_DATA and not batches:
        raise UserError(f"method {method!r} needs calibration batches (labelled images)")
    if method == "magnitude":
        return _per_group_normalised({g.id: unit_sums(model, g, lambda p: p.detach().abs()) for g in gs})
    if method == "taylor":
        return _grad_scores(model, batches, gs, second_order=False, log=log)
    if method == "nvit":
        return _grad_scores(model, batches, gs, second_order=True, log=log)
    if method == "wd":
        width = [g for g in gs if g.kind != "layers"]
        out = _gate_scores(model, batches, width, per_dim_heads=False, steps=steps, l1=l1, lr=lr, log=log)
        out.update(_depth_probe_scores(model, batches, [g for g in gs if g.kind == "layers"], depth_tol, log))
        return {g.id: out[g.id] for g in gs}
    if method == "spvit":
        return _spvit_scores(model, batches, gs, steps=steps, l1=l1, lr=lr, log=log)
    return _gate_scores(model, batches, gs, per_dim_heads=(method == "vtp"), steps=steps, l1=l1, lr=lr, log=log)
