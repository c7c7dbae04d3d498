"""Cascade rows of the host benchmark (`python -m mobilevit_deploy.bench --cascade 32,64`).

Per model, the cascade `.pte` is exported (`--target executorch --cascade S1,S2`, threshold chosen by
the export on the shipped samples) and two rows are timed round-robin with every other row:
- `pte_cascade`: one timed call = the cascade (`CascadeRunner.run_prepared`) over a fixed set of real
  images, the 40 shipped samples prepared at every stage size beforehand; the row's statistics are per
  image (each call's time / 40), so its median is the mean latency per image of that call;
- `pte_last_stage`: the last stage alone over the same 40 prepared images, per image.
The rows record the exit rate per stage on those images and the cascade's threshold.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["cascade_rows", "per_image", "ROW_TARGETS"]

ROW_TARGETS = ("pte_cascade", "pte_last_stage")


def cascade_rows(session, name: str, model, dcfg, art_dir: Path) -> list:
    """Export the cascade of `model` and return (key, BoundCall) for its two rows."""
    import sys

    from ..data import sample_images
    from ..export import ExportConfig, ModelSource, export_model
    from ..export.cascade import CascadeSpec
    from ..runtime import load_cascade
    from .runners import BoundCall

    cfg = session.cfg
    spec = CascadeSpec.from_value(cfg.cascade if isinstance(cfg.cascade, str) else ",".join(map(str, cfg.cascade)))
    config = ExportConfig("executorch", verify=False, cascade=spec)
    # a depth cascade's exit head belongs to the shipped weights (checked by their file's sha256): load them by name
    source = ModelSource(name) if spec.depth else ModelSource(name, deploy_cfg=dcfg, module=model)
    res = export_model(source, config, out_dir=str(art_dir / name),
                       log=lambda s: print(f"  export: {s}", file=sys.stderr))
    runner = load_cascade(res.artifact, num_threads=cfg.threads)
    samples = sample_images()
    labels = runner.deploy_cfg.class_labels
    inputs = [runner.prepare_all(p) for p, _ in samples]
    answers = [runner.run_prepared(xs) for xs in inputs]
    n, last = len(inputs), len(runner.stages) - 1
    exit_rates = [sum(a.stage == i for a in answers) / n for i in range(last + 1)]
    top1 = 100.0 * sum(a.label_index == labels.index(c) for a, (_, c) in zip(answers, samples)) / n
    info = {"images_per_call": n, "runtime": "executorch (xnnpack), cascade runner"}
    section = res.manifest["cascade"]
    from .flops import count_flops

    if spec.depth:  # exit branch on the image, rest branch on its features
        import torch

        from ..models.exit_head import load_depth_split
        from .flops import count_flops_on

        split = load_depth_split(model, name, spec.exit_after)
        x = runner.stage_cfgs[0].example_input(1)  # the cascade's size (the shipped weights'), not the row's
        with torch.no_grad():
            feats = split.exit_branch(x)[1]
        stage_gflops = [count_flops_on(split.exit_branch, x)["gflops"],
                        count_flops_on(split.rest_branch, feats)["gflops"]]
        alone_gflops = count_flops(model, runner.stage_sizes[0])["gflops"]
    else:
        stage_gflops = [count_flops(model, size)["gflops"] for size in runner.stage_sizes]
        alone_gflops = stage_gflops[-1]
    reach = [1.0 - sum(exit_rates[:i]) for i in range(last + 1)]  # fraction of images that run stage i
    cascade_gflops = sum(r * g for r, g in zip(reach, stage_gflops))
    common = {"input_size": list(runner.stage_sizes[-1]), "check": None, "accuracy": None}
    cascade_info = {"sizes": list(spec.sizes), "kind": runner.kind, "stages": runner.stage_names,
                    "threshold": runner.threshold,
                    "exit_rates": exit_rates, "images": n, "top1_on_images": top1,
                    "images_what": "the 40 shipped samples (CIFAR-10 train), prepared at every stage size"
                    if runner.kind == "sizes" else "the 40 shipped samples (CIFAR-10 train)",
                    "threshold_selection": section.get("threshold_selection")}
    stage, alone_input = runner.alone, runner.alone_input  # the last stage alone

    def run_cascade():
        for xs in inputs:
            runner.run_prepared(xs)

    def run_last():
        for xs in inputs:
            stage.run_one(xs[alone_input])

    threads = runner.num_threads or cfg.threads
    art, size = Path(res.artifact), res.manifest["artifact"]["size_bytes"]
    rows = []
    cascade_info["stage_gflops"] = stage_gflops
    for target, fn, extra in (("pte_cascade", run_cascade, {"cascade": cascade_info, "gflops": cascade_gflops}),
                              ("pte_last_stage", run_last, {"gflops": alone_gflops,
                                                            "cascade": {**cascade_info, "exit_rates": None,
                                                                        "what": runner.alone_what + " alone"}})):
        bc = BoundCall(target, "fp32", fn, fn, threads, art, size,
                       info={**info, "row_extra": {**common, **extra}})
        rows.append(((name, target, "fp32"), bc))
    return rows


def per_image(slots, samples_per_pass: int, before: dict) -> None:
    """Turn the last pass's timings of the cascade slots (one call = a set of images) into per-image times."""
    for s in slots:
        k = (s.runner.info or {}).get("images_per_call")
        if not k:
            continue
        start = before[s.key]
        s.round_medians[start:] = [m / k for m in s.round_medians[start:]]
        s.samples[-samples_per_pass:] = [t / k for t in s.samples[-samples_per_pass:]]
