"""`export --size H` / `HxW`: the input size of the exported graph.

`parse_size` turns the CLI / config form (256, "256", "256x192", [256, 192]) into (H, W) or raises
one UserError line with the allowed form; `with_input_size` gives the LoadedModel the DeployCfg of
that size (the model's module is not changed: every stage reads the LoadedModel's DeployCfg) after
checking, with one forward pass, that the model runs at it. Light to import (no torch at import).
"""
from __future__ import annotations

import re
from dataclasses import replace

from ..errors import UserError

MIN_SIZE = 32  # MobileViT / CMT downsample by 32
MAX_SIZE = 4096
WEIGHTS_SIZE_KEY = "weights_deploy_size"  # LoadedModel.meta: the size before --size
FORM = "--size H or HxW: positive integers from 32 to 4096, e.g. 256 or 256x192"

__all__ = ["parse_size", "format_size", "with_input_size", "FORM"]


def _bad(value) -> UserError:
    return UserError(f"bad --size {value!r}: expected {FORM}")


def parse_size(value) -> tuple[int, int] | None:
    """(H, W) from 256 | "256" | "256x192" | (256, 192); None stays None (the weights' deploy size)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise _bad(value)
    if isinstance(value, int):
        hw = (value, value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", value)
        if not m:
            raise _bad(value)
        h = int(m.group(1))
        hw = (h, int(m.group(2)) if m.group(2) else h)
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        hw = (value[0], value[1])
    else:
        raise _bad(value)
    if not all(MIN_SIZE <= v <= MAX_SIZE for v in hw):
        raise _bad(value)
    return hw


def format_size(hw) -> str:
    return f"{hw[0]}x{hw[1]}"


def with_input_size(loaded, hw: tuple[int, int] | None, log=lambda s: None):
    """`loaded` (a LoadedModel) with its DeployCfg at input size `hw` (None or the same size: unchanged).

    The model is run once at the new size (batch 1, no grad) so a model that cannot take it (a fixed
    position embedding, ...) is one UserError line before any stage runs."""
    cfg = loaded.deploy_cfg
    if hw is None or tuple(cfg.image_size) == tuple(hw):
        return loaded
    new_cfg = replace(cfg, input_size=(cfg.input_size[0], hw[0], hw[1]))
    import torch

    try:
        with torch.no_grad():
            loaded.module.eval()(new_cfg.example_input(1))
    except Exception as e:  # noqa: BLE001 -- any failure of the model at this size is the user's input
        raise UserError(f"--size {format_size(hw)}: {loaded.name} cannot run at this input size "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    h0, w0 = cfg.image_size
    log(f"size: exporting at {format_size(hw)} (the weights' deploy size is {h0}x{w0})")
    return replace(loaded, deploy_cfg=new_cfg, meta={**loaded.meta, WEIGHTS_SIZE_KEY: [h0, w0]})
