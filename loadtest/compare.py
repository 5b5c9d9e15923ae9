"""Compares two benchmark runs (before/after a change): a table of the service's figures and
their ratios, and a chart beside them.

    python -m loadtest.compare BEFORE/benchmark.json AFTER/benchmark.json --out compare.png

Each run's ratios to its own floor and baseline are what to compare (the machine is shared, so
absolute figures drift between runs); both are printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PHASES = (
    ("Authorize", "uniform"),
    ("Authorize", "hot spot"),
    ("Authorize+Capture", "uniform"),
    ("Authorize+Capture", "hot spot"),
)
FIGURES = (("throughput", "ops/s"), ("server_cpu_us", "server µs/op"), ("p99_ms", "p99 ms"))


def phase(run: dict[str, Any], system: str, operation: str, workload: str) -> dict[str, Any]:
    for found in run["phases"]:
        if (found["system"], found["operation"], found["workload"]) == (
            system,
            operation,
            workload,
        ):
            return dict(found)
    return {}


def rows(before: dict[str, Any], after: dict[str, Any]) -> list[list[str]]:
    table = []
    for operation, workload in PHASES:
        for key, label in FIGURES:
            old = phase(before, "service", operation, workload).get(key)
            new = phase(after, "service", operation, workload).get(key)
            if old is None or new is None:
                continue
            cells = [f"{operation} {workload}", label, f"{old:,.0f}", f"{new:,.0f}"]
            cells.append(f"{new / old:.2f}×" if old else "-")
            for other in ("floor", "baseline"):
                references = [
                    phase(run, other, operation, workload).get(key) for run in (before, after)
                ]
                if all(references):
                    cells.append(f"{old / references[0]:.2f}× → {new / references[1]:.2f}×")
                else:
                    cells.append("-")
            table.append(cells)
    return table


def chart(before: dict[str, Any], after: dict[str, Any], out: Path, labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(FIGURES), figsize=(16, 5))
    names = [f"{o.replace('Authorize+Capture', 'Auth+Capture')}\n{w}" for o, w in PHASES]
    width = 0.38
    for axis, (key, label) in zip(axes, FIGURES, strict=True):
        for offset, (run, name, colour) in enumerate(
            ((before, labels[0], "#9e9e9e"), (after, labels[1], "#1f77b4"))
        ):
            values = [phase(run, "service", o, w).get(key) or 0 for o, w in PHASES]
            positions = [i + (offset - 0.5) * width for i in range(len(PHASES))]
            bars = axis.bar(positions, values, width, label=name, color=colour)
            axis.bar_label(bars, fmt="%.0f", fontsize=8)
        axis.set_xticks(range(len(PHASES)), names, fontsize=8)
        better = "higher" if key == "throughput" else "lower"
        axis.set_title(f"service {label} ({better} is better)", fontsize=10)
    axes[0].legend()
    figure.suptitle(f"MedWallet AuthZ service: {labels[0]} vs {labels[1]}")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.compare", description=__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--labels", default="before,after", help="two names, comma-separated")
    parser.add_argument("--out", type=Path, help="the chart (PNG)")
    arguments = parser.parse_args(argv)
    before = json.loads(arguments.before.read_text())
    after = json.loads(arguments.after.read_text())
    labels = arguments.labels.split(",")
    header = ["phase", "figure", labels[0], labels[1], "after/before", "vs floor", "vs baseline"]
    table = [header, *rows(before, after)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if arguments.out:
        chart(before, after, arguments.out, labels)
        print(f"chart: {arguments.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
