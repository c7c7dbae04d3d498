"""What machine and tools a measurement was taken with, and the on-disk cache of measured latencies.

- `cpu_id()`: the CPU (model name and a hash of its flags), so a cached latency is never reused on
  another kind of machine;
- `runtime_versions()`: torch and executorch versions;
- `JsonCache(name, version)`: one JSON file in `~/.cache/mobilevit_deploy/` (or $MOBILEVIT_DEPLOY_CACHE)
  of {key: entry}, written atomically (the pruning latency table, the int8 per-layer latency plan).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MOBILEVIT_DEPLOY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                          "mobilevit_deploy"))


def cpu_id() -> dict:
    """{"machine", "model", "flags_sha"}: what the CPU is (Linux /proc/cpuinfo; platform elsewhere)."""
    name, flags = platform.processor() or "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k == "model name" and not name:
                    name = v.strip()
                elif k in ("flags", "Features") and not flags:
                    flags = v.strip()
                if name and flags:
                    break
    except OSError:
        pass
    return {"machine": platform.machine(), "model": name,
            "flags_sha": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]}


def cpu_key() -> str:
    c = cpu_id()
    return f"{c['machine']}:{c['model']}:{c['flags_sha']}"


def runtime_versions() -> dict:
    from importlib import metadata

    import torch

    try:
        et = metadata.version("executorch")
    except metadata.PackageNotFoundError:
        et = None
    return {"torch": torch.__version__, "executorch": et}


class JsonCache:
    """{key: entry} in one JSON file; a file of another `version` (or unreadable) reads as empty."""

    def __init__(self, filename: str, version: int):
        self.filename, self.version = filename, version

    @property
    def path(self) -> Path:
        return cache_dir() / self.filename

    def load(self) -> dict:
        try:
            d = json.loads(self.path.read_text())
            if isinstance(d, dict) and d.get("version") == self.version and isinstance(d.get("entries"), dict):
                return d
        except (OSError, ValueError):
            pass
        return {"version": self.version, "entries": {}}

    def get(self, key: str):
        return self.load()["entries"].get(key)

    def put(self, key: str, entry) -> None:
        self.put_many({key: entry})

    def put_many(self, entries: dict) -> None:
        from .checkpoint import atomic_write

        d = self.load()
        d["entries"].update(entries)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(d, indent=1)))
