"""Per-op profile of a model's XNNPACK `.pte` (ETDump + Inspector) and of its ONNX Runtime run.

    python -m benchmarks.profile_pte --model mobilevit_xxs --threads 1 --runs 30 --out /tmp/prof

Lowers the model exactly as `mobilevit_deploy.export` does (its capture and partitioner), with
`generate_etrecord=True`, runs it `--runs` times with ETDump enabled, and prints the Inspector's
per-event p50 (ms) grouped by event: every XNNPACK delegate call and every op left to the portable
kernels. Then ONNX Runtime with `enable_profiling` on the same model, grouped by op type.
Prints; writes nothing but the files under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path


def lower_with_etrecord(model, cfg, out: Path, ln_decomp: bool = False):
    from executorch.exir import to_edge_transform_and_lower

    from mobilevit_deploy.export import capture as cap
    from mobilevit_deploy.export.executorch import decompose_for_xnnpack, ops_outside_delegate, partitioners

    # what the export stage lowers; with --ln-decomp the LayerNorm rewrite also for a quantized program
    ep = decompose_for_xnnpack(cap.capture(model, cfg), quantized_too=ln_decomp)
    t = time.time()
    edge = to_edge_transform_and_lower(ep, partitioner=partitioners("xnnpack"), generate_etrecord=True)
    outside = ops_outside_delegate(edge.exported_program())
    et = edge.to_executorch()
    print(f"lowered in {time.time() - t:.0f} s; outside the delegate: {outside or 'nothing'}")
    pte = out / "model.pte"
    pte.write_bytes(et.buffer)
    et.get_etrecord().save(str(out / "model.etrecord"))
    return pte, outside


def profile_pte(pte: Path, out: Path, x, threads: int, runs: int):
    """ETDump + Inspector per op type: `mobilevit_deploy.bench.profile.profile_pte` (the one home of
    this profile; `python -m mobilevit_deploy.bench --profile` is its CLI), printed."""
    from mobilevit_deploy.bench.profile import profile_pte as _profile

    p = _profile(pte, x, threads=threads, runs=runs, workdir=out)
    med_total = p["execute_ms"]
    print(f"\nExecuTorch {pte.name}: wall median {p['wall_ms']:.2f} ms over {runs} runs ({threads} threads); "
          f"ETDump Method::execute median {med_total:.2f} ms, {p['delegate_calls']} delegate call(s)")
    print("  per op type: median over runs of the per-run sum, and share of Method::execute")
    rows = []
    for o in p["ops"]:
        key = f"{o['name']} [{'portable' if o['kind'] == 'portable' else 'xnnpack'}]"
        rows.append((key, o["count"], o["ms"]))
        print(f"  {o['ms']:8.3f} ms {100 * o['ms'] / med_total:5.1f} %  x{o['count']:<4} {key}")
    print(f"  {p['outside_ops_ms']:8.3f} ms {100 * p['outside_ops_ms'] / med_total:5.1f} %        "
          "outside any op (delegate entry/exit, runtime)")
    return rows, [p["wall_ms"]]


def profile_ort(model, cfg, out: Path, x, threads: int, runs: int):
    import onnxruntime as ort

    from mobilevit_deploy.export import capture as cap
    from mobilevit_deploy.export import onnx as ox

    ep = cap.capture(model, cfg)
    proto, info = ox.convert(ep, cfg)
    path = out / "model.onnx"
    ox.save(proto, path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = str(out / "ort_profile")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    for _ in range(5):
        sess.run(None, feed)
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        walls.append((time.perf_counter() - t0) * 1e3)
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    agg = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            agg[e["args"]["op_name"]][0] += e["dur"] / 1e3
            agg[e["args"]["op_name"]][1] += 1
    n = runs + 5
    walls.sort()
    print(f"\nONNX Runtime: wall median {walls[len(walls) // 2]:.2f} ms over {runs} runs ({threads} threads)")
    for k, (ms, c) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"  {ms / n:8.3f} ms/run  x{c // n:<3} {k}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilevit_xxs")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--out", default="/tmp/mobilevit_profile")
    p.add_argument("--no-ort", action="store_true")
    p.add_argument("--quant", default="fp32", choices=["fp32", "int8"],
                   help="int8: the export stage's executorch int8 scheme (pt2e W8A8, calibrated on the samples)")
    p.add_argument("--reuse", action="store_true", help="reuse model.pte + model.etrecord already in --out")
    p.add_argument("--ln-decomp", action="store_true",
                   help="decompose LayerNorm for XNNPACK in a quantized program (the export stage now does it "
                        "for quantized programs too; without this flag this study keeps the earlier behaviour)")
    a = p.parse_args(argv)
    from dataclasses import replace

    import torch

    from mobilevit_deploy import create_model
    from mobilevit_deploy.bench.harness import bench_input

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create_model(a.model)
    cfg = replace(model.deploy_cfg, input_size=(3, a.size, a.size))
    torch.set_num_threads(a.threads)
    x = bench_input(cfg)
    if a.reuse and (out / "model.pte").is_file() and (out / "model.etrecord").is_file():
        pte = out / "model.pte"
    else:
        to_lower = model
        if a.quant == "int8":
            from mobilevit_deploy.quantize import get_config, load_calibration, quantize_model

            to_lower = quantize_model(model, get_config("executorch", "int8"), deploy_cfg=cfg,
                                      calib=load_calibration(None)).module
        pte, _ = lower_with_etrecord(to_lower, cfg, out, a.ln_decomp)
    profile_pte(pte, out, x, a.threads, a.runs)
    if not a.no_ort:
        profile_ort(model, cfg, out, x, a.threads, a.runs)


if __name__ == "__main__":
    sys.exit(main())
