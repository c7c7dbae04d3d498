"""Checkpoint and file I/O: safetensors or torch `.pt` read with `weights_only=True`; atomic writes;
the sha256 of a file, a directory or a state dict; the size of an artifact (file or `.mlpackage`)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory (e.g. .mlpackage) as the hash of its sorted files."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(model) -> str:
    """sha256 over the sorted state dict of an nn.Module (the manifest's checkpoint hash of a module)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def artifact_size(path: str | os.PathLike) -> int:
    """Bytes of an artifact: a file, or every file below a directory (`.mlpackage`)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def load_state_dict(path: str | os.PathLike) -> dict:
    """Read a state dict from `.safetensors` or `.pt`/`.pth`/`.bin` (weights_only=True).

    Accepts a plain state dict or one wrapped under a usual key (`state_dict`, `model`, ...), and
    strips a DDP `module.` prefix.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            import torch

            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt file, pickle with non-tensor objects, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {first}") from e
    if isinstance(sd, dict):
        for k in _WRAPPER_KEYS:
            if k in sd and isinstance(sd[k], dict):
                sd = sd[k]
                break
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"checkpoint {p} holds no state dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_checkpoint(model, path: str | os.PathLike) -> None:
    """Load `path` into `model` strictly; a key or shape mismatch names the first offending keys."""
    sd = load_state_dict(path)
    from .models._apple_keys import apple_to_timm, is_apple_mobilevit

    if is_apple_mobilevit(sd):  # Apple's ml-cvnets / corenet MobileViT release -> timm key layout
        sd = apple_to_timm(sd)
    from .models.tnt import checkpoint_filter_fn, is_huawei_tnt

    if is_huawei_tnt(sd):  # the original Huawei TNT release -> timm key layout (timm's checkpoint_filter_fn)
        sd = checkpoint_filter_fn(sd, model if hasattr(model, "patch_pos") else None)
    own = model.state_dict()
    # Modules a dense checkpoint lacks (DynamicViT's prediction modules) keep their initialisation when
    # every key under them is missing (fine-tuning from the dense weights); a partial set is still an error.
    optional = getattr(model, "optional_state_prefixes", lambda: ())()
    for pre in optional:
        if not any(k.startswith(pre) for k in sd):
            sd.update({k: v for k, v in own.items() if k.startswith(pre)})
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if shape:
        problems.append(f"{len(shape)} shape mismatches (first: {'; '.join(shape[:3])})")
    if problems:
        name = type(model).__name__
        raise CheckpointError(f"checkpoint {path} does not match {name}: " + "; ".join(problems))
    sd = {k: v.to(own[k].dtype) for k, v in sd.items()}  # fp16 shipped weights -> fp32 model
    model.load_state_dict(sd, strict=True)


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Call `write_fn(tmp_path)` on a temporary path in the same folder, then rename onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_safetensors(state_dict: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))
