"""Staging directories of the export: `.<artifact>.staging.<host>.<pid>.<random>` inside `--out`.

An export builds its artifact in a hidden staging directory and renames it into place; a killed
export (SIGKILL, power loss) leaves that directory behind. `make_staging_dir` first removes the
stale ones: those whose process is gone (same host, pid not alive). A concurrent export's directory
(its pid alive, or made on another host sharing the folder) is left alone. Directories in the
earlier form without a pid (`.<artifact>.staging.<random>`) are removed once older than
`LEGACY_STALE_S`, since their owner cannot be asked.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["make_staging_dir", "stale_staging_dirs", "remove_stale_staging", "pid_alive", "STAGING_MARK"]

STAGING_MARK = ".staging."
LEGACY_STALE_S = 6 * 3600.0
_HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
# .<artifact name>.staging.<host>.<pid>.<mkdtemp random>
_NEW = re.compile(r"^\..+\.staging\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+$")
_LEGACY = re.compile(r"^\..+\.staging\.[A-Za-z0-9_]+$")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a process we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _is_stale(d: Path, now: float) -> bool:
    m = _NEW.match(d.name)
    if m:
        if m.group("host") != _HOST:
            return False  # another machine's export into a shared folder: cannot tell, leave it
        pid = int(m.group("pid"))
        return pid != os.getpid() and not pid_alive(pid)
    if _LEGACY.match(d.name):
        try:
            return now - d.stat().st_mtime > LEGACY_STALE_S
        except OSError:
            return False
    return False


def stale_staging_dirs(out_dir) -> list[Path]:
    """Staging directories in `out_dir` left by exports that are no longer running."""
    out, now = Path(out_dir), time.time()
    try:
        entries = list(out.iterdir())
    except OSError:
        return []
    return sorted(d for d in entries if d.name.startswith(".") and STAGING_MARK in d.name and d.is_dir()
                  and not d.is_symlink() and _is_stale(d, now))


def remove_stale_staging(out_dir, log=lambda s: None) -> list[Path]:
    """Remove the stale staging directories of `out_dir`; returns those removed."""
    removed = []
    for d in stale_staging_dirs(out_dir):
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
    if removed:
        log(f"staging: removed {len(removed)} staging director{'y' if len(removed) == 1 else 'ies'} left by "
            f"an earlier export that did not finish: {', '.join(d.name for d in removed)}")
    return removed


def make_staging_dir(out_dir, artifact_name: str, log=lambda s: None) -> Path:
    """Remove stale staging directories, then make this export's own (its host and pid in the name)."""
    remove_stale_staging(out_dir, log)
    return Path(tempfile.mkdtemp(prefix=f".{artifact_name}{STAGING_MARK}{_HOST}.{os.getpid()}.", dir=out_dir))
