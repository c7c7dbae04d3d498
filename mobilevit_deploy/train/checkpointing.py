"""End-of-epoch checkpoints that a killed run can resume from exactly.

Layout of `<out>/checkpoint/`:
  epoch_0007_model.safetensors   raw weights after epoch 7
  epoch_0007_ema.safetensors     EMA weights (when EMA is on)
  state.pt                       {epoch, global_step, optimizer, scheduler, ema meta, sampler, rng
                                  (per process), metrics history, config, file names + sha256}

Weights are written first under epoch-numbered names, then `state.pt` is replaced atomically; a
crash at any point leaves a `state.pt` that names complete files. Older epoch files are removed after
the new state is in place. `state.pt` holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import random
from pathlib import Path

from ..checkpoint import atomic_write, file_sha256, load_state_dict, save_safetensors
from ..errors import CheckpointError

STATE = "state.pt"


def rng_state() -> dict:
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
          "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(st["torch"])
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(ckpt_dir: str | Path, epoch: int, model_sd: dict, ema_sd: dict | None, state: dict) -> Path:
    """Write the weights of `epoch`, then the state naming them; drop the previous epoch's files."""
    import torch

    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    stem = f"epoch_{epoch:04d}"
    p = save_safetensors(model_sd, d / f"{stem}_model.safetensors")
    files["model"] = {"file": p.name, "sha256": file_sha256(p)}
    if ema_sd is not None:
        p = save_safetensors(ema_sd, d / f"{stem}_ema.safetensors")
        files["ema"] = {"file": p.name, "sha256": file_sha256(p)}
    state = dict(state, epoch=epoch, files=files)
    atomic_write(d / STATE, lambda tmp: torch.save(state, tmp))
    keep = {f["file"] for f in files.values()}
    for old in d.glob("epoch_*.safetensors"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return d / STATE


def load_checkpoint_state(ckpt_dir: str | Path) -> tuple[dict, dict, dict | None]:
    """(state, model state dict, ema state dict or None) of the last complete epoch."""
    import torch

    d = Path(ckpt_dir)
    sp = d / STATE
    if not sp.is_file():
        raise CheckpointError(f"nothing to resume: no {sp}")
    try:
        state = torch.load(sp, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {sp}: {type(e).__name__}: {e}") from e
    sds = {}
    for k in ("model", "ema"):
        if k in state["files"]:
            f = d / state["files"][k]["file"]
            if not f.is_file() or file_sha256(f) != state["files"][k]["sha256"]:
                raise CheckpointError(f"checkpoint file {f} is missing or does not match its sha256 in {sp}")
            sds[k] = load_state_dict(f)
    return state, sds["model"], sds.get("ema")
