"""Turn a finished run into the package's shipped default weights.

    python -m mobilevit_deploy.train.ship --run runs/NAME --val ../shared/data/cifar10/val \
        [--tag cifar10] [--sizes 48 64 96]

Writes `mobilevit_deploy/assets/weights/<model>_<tag>.safetensors` (fp16) and `<same stem>.json` with
model, recipe, data, epochs, val_top1, sha256, deploy_cfg (the schema read by
`mobilevit_deploy.pretrained`). `val_top1` is measured here on the fp16-rounded file with
`mobilevit_deploy.evaluate.evaluate` -- the same code and preprocessing (`data.eval_transform`) as
`python -m mobilevit_deploy.evaluate --data VAL`; with `--sizes`, `val_top1_per_size` holds the same
measurement at each input size (`evaluate --size S`).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..cli import ArgumentParser, run_cli
from ..errors import UserError


def ship(run: str | Path, val: str | Path, tag: str = "cifar10", dest: str | Path | None = None, progress: bool = True,
         sizes=()) -> dict:
    import torch

    from ..checkpoint import atomic_write, file_sha256, load_state_dict, save_safetensors
    from ..evaluate import evaluate
    from ..models import DeployCfg
    from ..pretrained import WEIGHTS_DIR

    run = Path(run)
    src, meta_src = run / "model.safetensors", run / "model.json"
    if not src.is_file() or not meta_src.is_file():
        raise UserError(f"{run} has no finished model.safetensors + model.json")
    meta = json.loads(meta_src.read_text())
    dest = Path(dest) if dest else WEIGHTS_DIR
    stem = f"{meta['model']}_{tag}"
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in load_state_dict(src).items()}
    w = save_safetensors(sd, dest / f"{stem}.safetensors")
    dcfg = DeployCfg.from_dict(meta["deploy_cfg"])
    r = evaluate(val, checkpoint=w, model=meta["model"], deploy_cfg=dcfg, progress=progress)
    recipe = f"recipes/{meta['recipe']}" if meta.get("recipe", "").endswith(".yaml") else meta.get("recipe")
    note = f"python -m mobilevit_deploy.evaluate --data {val} (fp16 weights, eval_transform(deploy_cfg))"
    out = {"model": meta["model"], "recipe": recipe,
           "data": meta["data"], "epochs": meta["epochs"], "val_top1": round(r.top1, 2),
           "val_images": r.total, "val_top1_note": note,
           "train_val_top1_fp32": meta.get("val_top1"), "weights": meta.get("weights"),
           "sha256": file_sha256(w), "deploy_cfg": dcfg.to_dict()}
    if sizes:
        out["val_top1_per_size"] = {str(s): round(evaluate(val, checkpoint=w, model=meta["model"], deploy_cfg=dcfg,
                                                           size=s, progress=progress).top1, 2) for s in sizes}
        out["val_top1_per_size_note"] = f"python -m mobilevit_deploy.evaluate --data {val} --size S"
    out.update(_run_summary(run))
    atomic_write(dest / f"{stem}.json", lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1) + "\n"))
    return out


def _run_summary(run: Path) -> dict:
    """Training time and throughput summed from the run's metrics.json, and its multi-size settings."""
    import yaml

    out = {}
    mpath, cpath = run / "metrics.json", run / "config.yaml"
    if mpath.is_file():
        rows = json.loads(mpath.read_text())
        train_s = sum(r.get("epoch_time_s", 0.0) for r in rows)
        out["train_time_s"] = round(train_s + sum(r.get("val_time_s", 0.0) for r in rows), 1)
        out["train_img_per_s"] = round(sum(r.get("images", 0) for r in rows) / max(train_s, 1e-9), 1)
    if cpath.is_file():
        cfg = yaml.safe_load(cpath.read_text()) or {}
        ms = cfg.get("multisize") or {}
        if ms.get("enabled"):
            out["multisize"] = {k: ms[k] for k in ("sizes", "kd_weight", "kd_temperature") if k in ms}
        init = (cfg.get("model") or {}).get("init_checkpoint")
        if init:  # a continued run: record what it started from (the earlier stage's own JSON, if beside it)
            out["init_from"] = _lineage(Path(init))
    return out


def _lineage(init: Path) -> dict:
    """The starting weights of a continued run: their sha256 and the recipe/epochs/top-1 their JSON records."""
    from ..checkpoint import file_sha256

    rec = {"sha256": file_sha256(init) if init.is_file() else None}
    meta = init.with_suffix(".json")
    if meta.is_file():
        m = json.loads(meta.read_text())
        rec.update({k: m[k] for k in ("recipe", "data", "epochs", "val_top1", "val_top1_per_size",
                                       "train_time_s", "multisize", "init_from") if k in m})  # the whole chain
    return rec


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m mobilevit_deploy.train.ship", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished training output directory")
    p.add_argument("--val", required=True, help="validation directory of class folders, for the recorded top-1")
    p.add_argument("--tag", default="cifar10")
    p.add_argument("--dest", help="destination folder (default: the package's assets/weights)")
    p.add_argument("--sizes", type=int, nargs="*", default=[], help="also record top-1 at these input sizes")
    a = p.parse_args(argv)
    out = ship(a.run, a.val, a.tag, a.dest, sizes=a.sizes)
    print(json.dumps({k: v for k, v in out.items() if k != "deploy_cfg"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
