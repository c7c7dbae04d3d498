"""The MobileViT paper's iPhone 12 latency figures, read from `benchmarks/paper_mobilevit.json`.

The figures are data with their table numbers as the source (never typed into code). `paper_figure`
finds the figure to compare a device report with: same model (our name), same patch configuration
(Config-A, 2/2/2, for this project's models) and an iPhone 12.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

# benchmarks/ at the repository root (a source checkout); override with MOBILEVIT_PAPER_DATA.
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "paper_mobilevit.json"
OUR_PATCH_SIZES = (2, 2, 2)  # Config-A, as built by mobilevit_deploy.models.mobilevit


@dataclass(frozen=True)
class PaperFigure:
    name: str  # the paper's model name, e.g. "MobileViT-XS"
    model: str | None  # ours, e.g. "mobilevit_xs"; None for models we do not build
    ms: float
    table: str  # e.g. "Table 11"
    patch_sizes: tuple[int, ...] | None
    patch_sizes_verified: bool
    device: str
    device_identifier: str
    precision: str
    input_size: tuple[int, int] | None = None
    note: str = ""

    @property
    def source(self) -> str:
        return f"MobileViT paper (arXiv 2110.02178) {self.table}, {self.device}, Core ML {self.precision}"


def paper_data_path() -> Path:
    return Path(os.environ.get("MOBILEVIT_PAPER_DATA", DEFAULT_PATH))


def load_paper_data(path: str | os.PathLike | None = None) -> dict:
    p = Path(path) if path is not None else paper_data_path()
    if not p.is_file():
        raise UserError(f"paper data not found: {p} (set MOBILEVIT_PAPER_DATA to benchmarks/paper_mobilevit.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"paper data {p}: not valid JSON ({e})") from None
    for i, row in enumerate(data.get("latency_ms", [])):
        for k in ("name", "ms", "table"):
            if k not in row:
                raise UserError(f"paper data {p}: latency_ms[{i}] misses '{k}'")
    return data


def paper_figures(path: str | os.PathLike | None = None) -> list[PaperFigure]:
    data = load_paper_data(path)
    setup = data.get("setup", {})
    out = []
    for row in data.get("latency_ms", []):
        ps = row.get("patch_sizes")
        out.append(PaperFigure(
            name=row["name"], model=row.get("model"), ms=float(row["ms"]), table=row["table"],
            patch_sizes=tuple(ps) if ps else None, patch_sizes_verified=bool(row.get("patch_sizes_verified", True)),
            device=setup.get("device", "iPhone 12"), device_identifier=setup.get("device_identifier", ""),
            precision=setup.get("precision", "fp32"),
            input_size=tuple(setup["input_size"]) if setup.get("input_size") else None, note=row.get("note", "")))
    return out


def paper_figure(model: str, path: str | os.PathLike | None = None) -> PaperFigure | None:
    """The paper's iPhone 12 figure for our `model` (Config-A patches), or None when the paper has none."""
    for f in paper_figures(path):
        if f.model == model and (f.patch_sizes is None or f.patch_sizes == OUR_PATCH_SIZES):
            return f
    return None


def no_figure_reason(model: str, path: str | os.PathLike | None = None) -> str:
    data = load_paper_data(path)
    return data.get("not_in_paper", {}).get(model, f"the paper has no iPhone 12 figure for {model}")


def compare_device_report(report, path: str | os.PathLike | None = None) -> dict:
    """{"paper_ms", "ratio" (measured / paper), "source", "note"} for a DeviceReport.

    A ratio is given only for an iPhone 12 report of a model the paper timed; otherwise ratio is None
    and `note` says why (other device, or no figure in the paper). The paper measured fp32; a report
    at another precision is still compared, and the note says so.
    """
    fig = paper_figure(report.model, path)
    if fig is None:
        return {"paper_ms": None, "ratio": None, "source": None, "note": no_figure_reason(report.model, path)}
    notes = []
    if not report.is_iphone12:
        return {"paper_ms": fig.ms, "ratio": None, "source": fig.source,
                "note": f"paper figure is for {fig.device}; report is from {report.device_name} "
                        f"({report.device_identifier})"}
    if report.precision != fig.precision:
        notes.append(f"report precision {report.precision} vs paper {fig.precision}")
    if fig.input_size and tuple(report.input_size) != fig.input_size:
        notes.append(f"report input {report.input_size[0]}x{report.input_size[1]} vs paper "
                     f"{fig.input_size[0]}x{fig.input_size[1]}")
    if not fig.patch_sizes_verified:
        notes.append("paper row's patch sizes recalled, not verified")
    return {"paper_ms": fig.ms, "ratio": report.median_ms / fig.ms, "source": fig.source, "note": "; ".join(notes)}
