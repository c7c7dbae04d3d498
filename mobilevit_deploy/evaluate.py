"""Top-1 of a checkpoint or an exported artifact on an ImageFolder directory.

    python -m mobilevit_deploy.evaluate --data DIR [--checkpoint PATH [--model NAME] | --artifact FILE] [--size S]

DIR holds class folders directly (`DIR/<class>/*.jpg`), e.g. `../shared/data/cifar10/val`. With
neither --checkpoint nor --artifact the package's shipped default weights of --model are evaluated.
Preprocessing is always `mobilevit_deploy.data.eval_transform(deploy_cfg)`, where the DeployCfg comes
from (in order): the checkpoint's sibling JSON (`model.safetensors` -> `model.json`, the schema of the
shipped weights), the artifact's manifest (`<artifact>.json`: input size, mean/std, crop, labels), or
the model's registered DeployCfg. The class folders of DIR must be the model's labels. `--size S`
evaluates a checkpoint (or the shipped weights) at S x S instead of its deploy size (same preprocessing
otherwise); an artifact has a static input size and takes only its own.

A cascade artifact (manifest `cascade` section, `export --cascade`) is run per image by
`runtime.CascadeRunner`: the result adds the exit rate per stage and the mean latency per image of the
cascade and of its last stage alone, measured in the same run (`cascade_eval.py`; `--json` under `cascade`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import CheckpointError, DataError, UserError


@dataclass
class EvalResult:
    top1: float
    correct: int
    total: int
    skipped: int
    source: str
    model: str
    deploy_cfg: object
    cascade: dict | None = None  # a cascade artifact: exit rates and mean latencies (cascade_eval.py)

    def line(self, data) -> str:
        h, w = self.deploy_cfg.image_size
        s = (f"top-1 {self.top1:.2f} % ({self.correct}/{self.total}) on {data} | {self.model} {self.source} "
             f"| input {h}x{w}")
        if self.skipped:
            s += f" | {self.skipped} undecodable image(s) skipped"
        if self.cascade is not None:
            c = self.cascade
            alone = c.get("alone", "last stage")
            s += (f"\ncascade {' -> '.join(c['stages'])}, threshold {c['threshold']:.4f}: exit rate "
                  + ", ".join(f"{n} {r * 100:.1f} %" for n, r in zip(c["stages"], c["exit_rates"]))
                  + f" | {alone} alone top-1 {c['last_stage_top1']:.2f} %"
                  + f"\nmean latency per image: cascade {c['mean_latency_ms']:.3f} ms, {alone} alone "
                  f"{c['last_stage_latency_ms']:.3f} ms ({c['latency_ratio']:.2f}x), {c['images']} images, "
                  f"{c['threads']} thread(s), same run")
        return s


def sibling_json(checkpoint: str | os.PathLike) -> Path:
    p = Path(checkpoint)
    return p.with_suffix(".json")


def deploy_cfg_from_manifest(manifest: dict):
    """The DeployCfg an artifact was exported with, from its manifest's `input` and `labels`."""
    from .models import DeployCfg

    try:
        inp, labels = manifest["input"], list(manifest["labels"])
        shape = inp["shape"]
        return DeployCfg(input_size=(3, int(shape[2]), int(shape[3])), mean=tuple(inp["mean"]), std=tuple(inp["std"]),
                         crop_pct=float(inp.get("crop_pct", 1.0)), interpolation=inp.get("interpolation", "bicubic"),
                         num_classes=len(labels), labels=tuple(labels))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise UserError(f"artifact manifest lacks a usable input spec / labels: {type(e).__name__}: {e}") from e


def _class_mapping(data_classes: Sequence[str], labels: Sequence[str], data, what: str) -> list[int]:
    """Model label index of every data class; UserError naming both lists when they differ."""
    if set(data_classes) != set(labels):
        raise DataError(f"class folders of {data} do not match the labels of {what}: data has {sorted(data_classes)}, "
                        f"model has {list(labels)}")
    pos = {label: i for i, label in enumerate(labels)}
    return [pos[c] for c in data_classes]


def evaluate(data: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
             artifact: str | os.PathLike | None = None, model: str | None = None, deploy_cfg=None,
             batch_size: int = 100, limit: int | None = None, progress: bool = True, threads: int | None = None,
             size: int | None = None, model_kwargs: dict | None = None) -> EvalResult:
    """Top-1 of a checkpoint, an artifact or the shipped weights (neither given) on `data`.
    `model_kwargs`: constructor options (--model-arg, e.g. keep_rate) for a checkpoint or shipped weights."""
    import torch
    from tqdm import tqdm

    from .data import ImageFolderDataset, eval_transform, find_classes

    if checkpoint is not None and artifact is not None:
        raise UserError("give --checkpoint or --artifact, not both")
    if size is not None and not 16 <= int(size) <= 4096:
        raise UserError(f"--size must be an input side in pixels between 16 and 4096, got {size}")
    data = Path(data)
    data_classes = find_classes(data)  # DataError for a missing/empty directory
    if threads:
        torch.set_num_threads(threads)

    if artifact is not None and _is_cascade(artifact):
        if size is not None:
            raise UserError(f"--size {size}: {Path(artifact).name} is a cascade with static stage sizes; "
                            "evaluate it without --size")
        return _evaluate_cascade(data, artifact, limit=limit, progress=progress, threads=threads)
    if artifact is not None:
        from .runtime import load_artifact

        runner = load_artifact(artifact, num_threads=threads)
        manifest = runner.manifest
        if manifest is None:
            raise UserError(f"{artifact} has no manifest ({Path(str(artifact) + '.json').name}); "
                            "it tells the input size, normalisation and labels")
        dcfg = deploy_cfg or deploy_cfg_from_manifest(manifest)
        if size is not None and tuple(dcfg.image_size) != (size, size):
            h, w = dcfg.image_size
            raise UserError(f"--size {size}: {Path(artifact).name} was exported with a static {h}x{w} input; "
                            f"evaluate it without --size, or export it at {size} px")
        name, source = manifest.get("model", "?"), f"artifact {Path(artifact).name}"
        batch = int(manifest["input"]["shape"][0]) if manifest["input"]["shape"][0] else 1

        def fn(x):
            return runner(x)
    else:
        from .models import create_model

        if checkpoint is None:
            from .pretrained import shipped_weights

            name = model or "mobilevit_xxs"
            sw = shipped_weights(name)
            if sw is None:
                raise UserError(f"no shipped weights for {name}: pass --checkpoint PATH")
            checkpoint, meta = sw.path, sw.meta
            source = f"shipped weights {sw.path.name}"
        else:
            if not Path(checkpoint).is_file():
                raise CheckpointError(f"checkpoint not found: {checkpoint}")
            j = sibling_json(checkpoint)
            meta = json.loads(j.read_text()) if j.is_file() and j != Path(checkpoint) else {}
            source = f"checkpoint {Path(checkpoint).name}"
        name = model or meta.get("model")
        if name is None:
            raise UserError(f"{checkpoint} has no sibling JSON naming its model: pass --model")
        if deploy_cfg is not None:
            dcfg = deploy_cfg
        elif "deploy_cfg" in meta:
            from .models import DeployCfg

            dcfg = DeployCfg.from_dict(meta["deploy_cfg"])
        else:
            from .models import get_deploy_cfg

            dcfg = get_deploy_cfg(name, num_classes=len(data_classes), labels=data_classes)
        if size is not None:
            dcfg = replace(dcfg, input_size=(3, int(size), int(size)))
        net = create_model(name, checkpoint=str(checkpoint), deploy_cfg=dcfg, **(model_kwargs or {})).eval()
        batch = batch_size

        def fn(x):
            with torch.no_grad():
                return net(x)

    labels = dcfg.class_labels
    mapping = _class_mapping(data_classes, labels, data, f"{name} ({source})")
    ds = ImageFolderDataset(data, eval_transform(dcfg), classes=data_classes)
    if limit:
        ds.samples = ds.samples[:: max(1, len(ds.samples) // limit)][:limit]
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
    remap = torch.tensor(mapping)
    correct = total = 0
    for x, y in tqdm(loader, desc=f"evaluate {name}", disable=not progress, unit="batch"):
        logits = fn(x)
        correct += int((logits.argmax(1) == remap[y]).sum())
        total += len(y)
    if ds.bad:
        import warnings

        warnings.warn(f"{len(ds.bad)} undecodable image(s) skipped in {data}", stacklevel=2)
    return EvalResult(100.0 * correct / max(total, 1), correct, total, len(ds.bad), source, name, dcfg)


def _is_cascade(artifact) -> bool:
    from .export.manifest import manifest_path_for, read_manifest

    p = manifest_path_for(artifact)
    return p.is_file() and bool(read_manifest(p).get("cascade"))


def _evaluate_cascade(data, artifact, *, limit=None, progress=True, threads=None) -> EvalResult:
    """Top-1, exit rate per stage and mean latency per image (cascade and last stage alone, same run)."""
    from .cascade_eval import labelled_images, measure_cascade, prepare_inputs
    from .runtime import load_cascade

    runner = load_cascade(artifact, num_threads=threads)
    paths, ys = labelled_images(data, runner.deploy_cfg.class_labels, limit)
    m = measure_cascade(runner, prepare_inputs(runner, paths, progress), ys, progress=progress)
    correct = round(m.top1 * m.images / 100)
    return EvalResult(m.top1, correct, m.images, 0, f"cascade artifact {Path(artifact).name}",
                      runner.manifest.get("model", "?"), runner.deploy_cfg, cascade=m.to_dict())


def main(argv=None) -> int:
    from .cli import ArgumentParser

    p = ArgumentParser(prog="python -m mobilevit_deploy.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory of class folders (DIR/<class>/*.jpg)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help=".safetensors / .pt weights (sibling .json gives model and preprocessing)")
    g.add_argument("--artifact",
                   help="exported .pte / .onnx (/.mlpackage on macOS); its manifest gives the preprocessing")
    p.add_argument("--model", help="model name (default: from the checkpoint JSON, else mobilevit_xxs)")
    p.add_argument("--size", type=int, help="input side S: evaluate at S x S instead of the deploy size (checkpoints)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model option for a checkpoint (repeatable; YAML value), e.g. keep_rate=0.7")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--limit", type=int, help="evaluate only N images spread over DIR")
    p.add_argument("--threads", type=int, help="torch / runtime threads")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    from .models.options import parse_model_args

    margs = parse_model_args(a.model_arg)
    if margs and a.artifact:
        raise UserError("--model-arg applies to --checkpoint / shipped weights; an artifact's graph is fixed at export")
    r = evaluate(a.data, checkpoint=a.checkpoint, artifact=a.artifact, model=a.model, batch_size=a.batch_size,
                 limit=a.limit, progress=not a.no_progress, threads=a.threads, size=a.size, model_kwargs=margs)
    print(r.line(a.data))
    if a.json:
        from .checkpoint import atomic_write

        doc = {"data": str(a.data), "model": r.model, "source": r.source, "top1": r.top1, "correct": r.correct,
               "total": r.total, "skipped": r.skipped, "deploy_cfg": r.deploy_cfg.to_dict()}
        if r.cascade is not None:
            doc["cascade"] = r.cascade
        atomic_write(a.json, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    raise SystemExit(run_cli(main))
