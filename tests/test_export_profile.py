"""ExecuTorch export phases and speed-up (export/et_lowering.py), the LayerNorm rewrite for quantized
programs, and the bench's --profile mode (bench/profile.py). The lowering tests take 30-160 s on the
shared 2-core machine (several lowerings each), so they are marked slow."""
from __future__ import annotations

import hashlib

import pytest
import torch

from mobilevit_deploy.export import executorch as et

pytest.importorskip("executorch")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.ln = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x).flatten(2).transpose(1, 2)
        return self.fc(self.ln(y))  # [1, N, 10]: every op delegable


def _tiny():
    torch.manual_seed(0)
    return Tiny().eval()


def _ep(m):
    return torch.export.export(m, (torch.randn(1, 3, 32, 32),))


def _same_pte_inside(patch, ep=None, **off) -> bool:
    """`ep` (default: the tiny model) lowered with the switches `off` off, and again inside `patch`: the
    same .pte?"""
    ep = ep if ep is not None else _ep(_tiny())
    plain, _ = et.lower(ep, **off)
    with patch:
        patched, _ = et.lower(ep, **off)
    return hashlib.sha256(plain.buffer).digest() == hashlib.sha256(patched.buffer).digest()


@pytest.mark.slow
def test_trimmed_provenance_gives_the_same_pte_and_phases_are_timed():
    ep = _ep(_tiny())
    phases: dict = {}
    fast, _ = et.lower(ep, timings=phases)
    slow, _ = et.lower(ep, trim_provenance=False)
    assert hashlib.sha256(fast.buffer).digest() == hashlib.sha256(slow.buffer).digest()
    for k in ("decompositions", "edge_dialect", "partitioning", "delegate_preprocess", "to_executorch"):
        assert k in phases and phases[k] >= 0, phases
    # the patch is undone afterwards
    from torch.fx import traceback as fx_tb

    from mobilevit_deploy.export.et_lowering import shallow_provenance

    before = fx_tb.NodeSource.__init__
    with shallow_provenance():
        assert fx_tb.NodeSource.__init__ is not before
    assert fx_tb.NodeSource.__init__ is before


@pytest.mark.slow
def test_export_manifest_records_lowering_phases(tmp_path):
    from dataclasses import replace

    from mobilevit_deploy.export import ExportConfig, export_model
    from mobilevit_deploy.models import get_deploy_cfg
    from mobilevit_deploy.pretrained import ModelSource

    m = _tiny()
    m.deploy_cfg = replace(get_deploy_cfg("mobilevit_xxs"), input_size=(3, 32, 32), num_classes=10, labels=())
    res = export_model(ModelSource("tiny", module=m), ExportConfig("executorch", verify=False), out_dir=tmp_path,
                       log=None)
    t = res.manifest["timings_s"]
    for k in ("capture", "lower", "lower.decompositions", "lower.edge_dialect", "lower.partitioning",
              "lower.delegate_preprocess", "lower.to_executorch", "serialize", "total"):
        assert k in t, t
    assert "_lower_phases_s" not in res.manifest
    assert t["lower"] >= t["lower.edge_dialect"] + t["lower.delegate_preprocess"] - 1e-3


@pytest.mark.slow
def test_quantized_program_layernorm_is_delegated():
    """A pt2e int8 program with a LayerNorm: one delegate call, nothing left to the portable kernels
    (before, its LayerNorm ran in the portable kernels between two delegate calls)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    m = _tiny()
    x = torch.randn(1, 3, 32, 32)
    gm = torch.export.export(m, (x,)).module()
    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(gm, q)
    for _ in range(4):
        prepared(torch.randn(1, 3, 32, 32))
    converted = convert_pt2e(prepared)
    ep = torch.export.export(converted, (x,))
    prog, outside = et.lower(ep)
    assert not any("layer_norm" in k for k in outside), outside
    _, outside_old = et.lower(ep, decompose_quantized=False)
    assert any("layer_norm" in k for k in outside_old), outside_old
    from executorch.runtime import Runtime

    out = Runtime.get().load_program(prog.buffer).load_method("forward").execute([x])[0]
    ref = converted(x)
    assert torch.allclose(out, ref, atol=0.15), (out - ref).abs().max()


@pytest.mark.slow
def test_profile_pte_lists_delegate_calls_and_ops(tmp_path):
    from mobilevit_deploy.bench.profile import format_profile, lscpu_flags, profile_pte

    prog, _ = et.lower(_ep(_tiny()))
    pte = tmp_path / "tiny.pte"
    pte.write_bytes(prog.buffer)
    p = profile_pte(pte, torch.randn(1, 3, 32, 32), threads=1, runs=4, warmup=2, workdir=tmp_path)
    assert p["delegate_calls"] == 1 and p["execute_ms"] > 0
    kinds = {o["kind"] for o in p["ops"]}
    assert kinds == {"xnnpack"}, p["ops"]
    assert any("Fully Connected" in o["name"] or "GEMM" in o["name"] for o in p["ops"])
    doc = {"models": ["tiny"], "size": [32, 32], "command": "x", "created": "now", "cpu": lscpu_flags(),
           "loadavg": [0.0, 0, 0], "threads": 1, "runs": 4,
           "artifacts": [{"label": "tiny fp32", "file": "tiny.pte", "size_bytes": 7720, "ops_not_delegated": {},
                          "profile": p}]}
    md = format_profile(doc)
    assert "| tiny fp32 |" in md and "Converts: 0" in md and "Portable ops: 0" in md


def test_bench_profile_bad_runs_is_exit_2(capsys):
    from mobilevit_deploy.bench.__main__ import main
    from mobilevit_deploy.cli import run_cli

    rc = run_cli(main, ["--profile", "--runs", "0"])
    _, err = capsys.readouterr()
    assert rc == 2 and err.strip().startswith("error:") and "--runs" in err


class TinyReluBn(torch.nn.Module):
    """conv + BN + ReLU (FuseBatchNorm / FuseActivation apply), LayerNorm, linear, softmax-bmm attention."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.bn = torch.nn.BatchNorm2d(8)
        self.ln = torch.nn.LayerNorm(8)
        self.qkv = torch.nn.Linear(8, 24)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)  # [1, N, 8]
        q, k, v = self.qkv(self.ln(y)).chunk(3, dim=-1)
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v  # [1, N, 8]
        return self.fc(a + y)


def test_lean_pass_table_matches_executorch():
    """The skip table names ExecuTorch's XNNPACK passes, and its key op sets are held by every pattern
    graph of the passes that match patterns (so a program without them cannot match)."""
    from executorch.backends.xnnpack import _passes as xp
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa

    from mobilevit_deploy.export import et_lowering as lo

    default = {p.__name__ for p in xp.XNNPACKPassManager(_ep(_tiny())).passes}
    assert set(lo._PASS_APPLIES) <= default, set(lo._PASS_APPLIES) - default

    def ops(g):
        return {getattr(n.target, "__name__", str(n.target)) for n in g.graph.nodes if n.op == "call_function"}

    for pattern in sdpa.get_graphs():
        assert lo.SDPA_KEY_OPS <= ops(pattern)
    for pattern in bilinear_2d.get_graphs_dict():
        assert lo.BILINEAR_KEY_OPS <= ops(pattern)


@pytest.mark.parametrize("make", [_tiny, lambda: TinyReluBn().eval()], ids=["tiny", "relu_bn_attention"])
def test_lean_passes_and_skipped_decompositions_give_the_same_pte(make):
    from executorch.backends.xnnpack import _passes as xp
    from executorch.exir.program import _program
    from torch.export import ExportedProgram

    from mobilevit_deploy.export.et_lowering import lean_edge_passes, lean_xnnpack_passes, skip_noop_decompositions

    torch.manual_seed(0)
    ep = _ep(make())
    full, _ = et.lower(ep, lean_passes=False, skip_decompositions=False, validate_once=False, delegate_meta=False,
                       fuse_edge=False, defer_retraces=False)
    passes: list = []  # (pass, ran) per pass and delegated subgraph
    decomps: list = []  # skipped? per run_decompositions call
    with lean_xnnpack_passes(passes), lean_edge_passes(passes), skip_noop_decompositions(decomps):
        lean, _ = et.lower(ep, lean_passes=False, skip_decompositions=False, fuse_edge=False)
    assert hashlib.sha256(lean.buffer).digest() == hashlib.sha256(full.buffer).digest()
    assert ("PReLUReshapePass", False) in passes and ("Conv1dUnsqueezePass", False) in passes
    assert ("ChannelsLastTaggedReshapePass", True) in passes  # not in the table: always runs
    assert ("NormalizeTransposePass", False) in passes and ("SymToTensorPass", False) in passes  # Edge passes
    if make is not _tiny:  # the ReLU after the (fused) BN is fused into the conv: that pass must run
        assert ("FuseActivationPass", True) in passes
    assert decomps[0] is False and True in decomps, decomps  # the first (our LayerNorm rewrite) always runs
    # the patches are undone afterwards
    before = xp.XNNPACKPassManager.transform, ExportedProgram.run_decompositions, _program._get_aten_to_edge_passes
    with lean_xnnpack_passes(), skip_noop_decompositions(), lean_edge_passes():
        assert xp.XNNPACKPassManager.transform is not before[0]
        assert ExportedProgram.run_decompositions is not before[1]
        assert _program._get_aten_to_edge_passes is not before[2]
    assert (xp.XNNPACKPassManager.transform, ExportedProgram.run_decompositions,
            _program._get_aten_to_edge_passes) == before


def _coreml_payloads(buffer: bytes, tmp_path) -> list:
    """(ML program proto, weight file bytes) of every Core ML delegate payload of a `.pte`."""
    import coremltools as ct
    from executorch.backends.apple.coreml import executorchcoreml

    tmp_path.mkdir(parents=True, exist_ok=True)
    pte = tmp_path / "p.pte"
    pte.write_bytes(buffer)
    out = []
    for i, (backend, blob) in enumerate(et.inspect_pte(pte)["delegate_blobs"]):
        d = tmp_path / f"payload{i}"
        d.mkdir()
        assert backend == "CoreMLBackend" and executorchcoreml.unflatten_directory_contents(blob, str(d))
        pkg = d / "lowered_module" / "model.mlpackage"
        spec = ct.models.MLModel(str(pkg), skip_model_load=True).get_spec()
        weights = sorted(f.read_bytes() for f in pkg.rglob("*.bin"))
        out.append((spec.mlProgram.SerializeToString(deterministic=True), weights))
    return out


def test_speedups_give_the_same_program_with_the_coreml_delegate(tmp_path):
    """The Edge-side speed-ups apply to every backend. The Core ML delegate's payload is not byte-stable
    run to run (a random model identifier, and the package manifest ordered by random ids), so its ML
    program and weights are compared."""
    ep = _ep(_tiny())
    fast, _ = et.lower(ep, backend="coreml")
    slow, _ = et.lower(ep, backend="coreml", trim_provenance=False, lean_passes=False, skip_decompositions=False,
                       validate_once=False, delegate_meta=False, fuse_edge=False,
                       defer_retraces=False)
    a, b = _coreml_payloads(fast.buffer, tmp_path / "fast"), _coreml_payloads(slow.buffer, tmp_path / "slow")
    assert len(a) == 1 and a == b


@pytest.mark.slow
def test_speedups_give_the_same_pte_for_the_default_model():
    """The shipped mobilevit_xxs, fp32: every lowering speed-up on vs all off, byte-identical .pte."""
    from mobilevit_deploy.export import capture as cap
    from mobilevit_deploy.pretrained import load_model

    src = load_model("mobilevit_xxs")
    ep = cap.capture(src.module, src.deploy_cfg)
    fast, _ = et.lower(ep)
    slow, _ = et.lower(ep, trim_provenance=False, lean_passes=False, skip_decompositions=False,
                       validate_once=False, delegate_meta=False, fuse_edge=False,
                       defer_retraces=False)
    assert hashlib.sha256(fast.buffer).digest() == hashlib.sha256(slow.buffer).digest()


def test_import_exir_parses_the_edge_table_as_ruamel_does():
    """import_exir's libyaml parse of ExecuTorch's Edge operator table equals ruamel's (the loader
    ExecuTorch itself uses), and the swap does not outlive the import."""
    from importlib import resources

    import executorch.exir.dialects.edge as edge_package
    import ruamel.yaml

    from mobilevit_deploy.export.et_lowering import import_exir

    import_exir()
    from executorch.exir.dialects.edge import _ops

    text = (resources.files(edge_package) / "edge.yaml").read_text(encoding="utf-8")
    by_ruamel = {e["inherits"]: e for e in ruamel.yaml.YAML(typ="safe").load(text)}
    assert by_ruamel and _ops._edge_dialect_info == by_ruamel
    assert _ops.YAML is ruamel.yaml.YAML and ruamel.yaml.YAML.__module__.startswith("ruamel")


def test_validate_once_defers_per_pass_checks_and_still_validates():
    """Inside validate_once the per-pass verifications are deferred, the Edge program is validated once
    after the conversion, lower() validates the result, the .pte is the same, and the patch is undone."""
    from torch.export import ExportedProgram

    from mobilevit_deploy.export.et_lowering import validate_now, validate_once

    record: list = []
    assert _same_pte_inside(validate_once(record), validate_once=False)
    assert record.count("deferred") >= 5 and record.count("validated") == 1, record
    before = ExportedProgram._validate
    with validate_once():
        assert ExportedProgram._validate is not before
    assert ExportedProgram._validate is before

    # a program its verifier rejects still fails in validate_now
    class Broken:
        verifiers = []

    with pytest.raises(AssertionError, match="at least one verifier"):
        validate_now(Broken())


def test_lower_of_several_methods_equals_executorchs_own():
    """lower({method: program}) (the cascade's one-program-per-stage lowering) gives ExecuTorch's own
    multi-method program byte for byte, with the ops outside the delegate per method."""
    from executorch.exir import to_edge_transform_and_lower

    m = _tiny()
    progs = {f"forward_{s}": torch.export.export(m, (torch.randn(1, 3, s, s),)) for s in (16, 32)}
    fast, outside = et.lower(progs)
    own = to_edge_transform_and_lower({k: et.decompose_for_xnnpack(p) for k, p in progs.items()},
                                      partitioner=et.partitioners("xnnpack")).to_executorch()
    assert hashlib.sha256(fast.buffer).digest() == hashlib.sha256(own.buffer).digest()
    assert outside == {"forward_16": {}, "forward_32": {}}


def test_delegate_outputs_from_meta_give_the_same_pte():
    """Passes after partitioning answer the delegate call's fake outputs from metadata (at least once),
    the .pte is the same as with the delegated program re-run, and the patch is undone."""
    from executorch.exir.delegate import executorch_call_delegate
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mobilevit_deploy.export.et_lowering import delegate_outputs_from_meta

    record: list = []
    assert _same_pte_inside(delegate_outputs_from_meta(record), delegate_meta=False)
    assert record and all(record), record
    before = executorch_call_delegate.python_key_table[FakeTensorMode]
    with delegate_outputs_from_meta():
        assert executorch_call_delegate.python_key_table[FakeTensorMode] is not before
    assert executorch_call_delegate.python_key_table[FakeTensorMode] is before


def _quantized_tiny_ep():
    """The tiny model as a pt2e static int8 program (XNNPACK quantizer, per-channel weights)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    prepared = prepare_pt2e(_ep(_tiny()).module(),
                            XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    for _ in range(4):
        prepared(torch.randn(1, 3, 32, 32))
    return torch.export.export(convert_pt2e(prepared), (x,))


class HalfRoundTrip(torch.nn.Module):
    """A float16 round trip (`_to_copy` nodes, which RemoveToCopyPass acts on): the passes cannot be fused."""

    def forward(self, x):
        return (x * 0.5).to(torch.float16).to(torch.float32) + 1.0


def test_fused_edge_passes_give_the_same_pte():
    """The ATen -> Edge operator-rewriting passes (view copies ... memory format) as one re-trace: the same
    .pte, fused when nothing between them can act, ExecuTorch's own sequence otherwise; patches undone."""
    from executorch.exir.program import _program

    from mobilevit_deploy.export.et_lowering import fused_edge_passes

    record: list = []
    assert _same_pte_inside(fused_edge_passes(record), fuse_edge=False)
    assert record == [True]
    record.clear()
    half = torch.export.export(HalfRoundTrip(), (torch.randn(1, 8),))
    assert _same_pte_inside(fused_edge_passes(record), ep=half, fuse_edge=False)
    assert record == [False]
    record.clear()  # dequantize ops do not block the fusion (no dq -> q pair to fold)
    assert _same_pte_inside(fused_edge_passes(record), ep=_quantized_tiny_ep(), fuse_edge=False)
    assert record == [True]
    names = ("_get_aten_to_edge_passes", "ReplaceViewOpsWithViewCopyOpsPass", "OpReplacePass", "MemoryFormatOpsPass")
    before = [getattr(_program, n) for n in names]
    with fused_edge_passes():
        assert all(getattr(_program, n) is not b for n, b in zip(names, before))
    assert [getattr(_program, n) for n in names] == before


@pytest.mark.parametrize("make", [_tiny, lambda: TinyReluBn().eval()], ids=["tiny", "relu_bn_attention"])
def test_deferred_xnnpack_retraces_give_the_same_pte(make):
    """FuseBatchNorm's and ChannelsLastTaggedReshape's closing re-traces left to RemoveRedundantCopy's:
    the same .pte, and quantized programs are left alone."""
    from mobilevit_deploy.export.et_lowering import _DEFER_RETRACES, deferred_xnnpack_retraces

    torch.manual_seed(0)
    record: list = []
    assert _same_pte_inside(deferred_xnnpack_retraces(record), ep=_ep(make()), defer_retraces=False)
    assert "ChannelsLastTaggedReshapePass" in record
    if make is _tiny:
        assert "re-trace" not in record  # RemoveRedundantCopy paid it
    else:  # several delegated subgraphs, some with no copy to remove: one re-trace paid after the last pass
        assert "FuseBatchNormPass" in record and "re-trace" in record
    assert not _DEFER_RETRACES
    quantized: list = []
    assert _same_pte_inside(deferred_xnnpack_retraces(quantized), ep=_quantized_tiny_ep(), defer_retraces=False)
    assert quantized == []
