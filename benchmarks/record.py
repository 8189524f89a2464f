"""How every benchmark reports: the machine it ran on, a table on the terminal, and the same rows as JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"  # default home of the JSON files the README's table quotes
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write(
    name: str,
    rows: list[dict[str, Any]],
    out: Path,
    meta: dict[str, Any],
    columns: list[str] | None = None,
    console: Console | None = None,
) -> Path:
    """Print `rows` as a table (only `columns`, when given, that some row has) and write
    {benchmark, when, machine, meta, rows} to `out`."""
    console = console or Console(width=160)
    table = Table(title=name)
    present = list(dict.fromkeys(k for row in rows for k in row))
    columns = [c for c in columns if c in present] if columns else present
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(_fmt(row.get(col)) for col in columns))
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "meta": meta, "rows": rows}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    console.print(f"wrote {out}")
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
