"""Structured pruning of MobileViT into smaller dense models that export (project issue 15).

    python -m mobilevit_deploy.prune --data DIR --target-macs 0.7 --out runs/pruned
    create_model("mobilevit_xxs", checkpoint="runs/pruned/model.safetensors")   # the pruned model

Modules: `structures` (prunable groups and the weight slices of each unit), `surgery` (removal on
module instances), `record` (the architecture record in model.json and `apply_architecture`),
`cost` (MACs, counted and predicted), `importance` (taylor, magnitude, nvit, slim, vtp, wd, spvit),
`modules` (ConvAttention, spvit's convolutional replacement of an attention layer),
`budget` (global importance / cost allocation), `latency` (the .pte latency table), `stage`
(`PruneConfig`, `prune`: the whole stage with KD fine-tuning). See docs/pruning.md.

Importing this package is light: the names below are resolved on first use.
"""
from __future__ import annotations

__all__ = ["PruneConfig", "PruneResult", "prune", "apply_architecture", "architecture_of", "apply_plan", "groups",
           "count_macs", "count_params", "CostModel", "score", "allocate", "write_pruned", "measure_pte_latency",
           "export_pte", "METHODS", "IMPLEMENTED", "KINDS"]

_WHERE = {
    "PruneConfig": "stage", "PruneResult": "stage", "prune": "stage", "write_pruned": "stage",
    "apply_architecture": "record", "architecture_of": "record",
    "apply_plan": "surgery", "groups": "structures", "KINDS": "structures",
    "count_macs": "cost", "count_params": "cost", "CostModel": "cost",
    "score": "importance", "METHODS": "importance", "IMPLEMENTED": "importance",
    "allocate": "budget", "measure_pte_latency": "latency", "export_pte": "latency",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
