"""The worker sweep on the 16-core machine, before and after issue 12, as one chart.

    python -m loadtest.devbench_sweep_chart loadtest/results/devbench-2026-12-04

Before: the figures issue 15 quotes (commit 73088ae, the same `.devbench` bundle on a 16-core
machine of the same kind; PostgreSQL ledger, uniform workload). After: each `b-pg-w<N>/`
folder's `benchmark.json` in the results folder; a run with no `benchmark.json` (the 8-worker
run was cut by the bundle's time budget) is taken from its progress lines in
`run-log-tail.txt` ("service  Authorize  uniform : done: 20,000 ops in 4.3s (4,601 ops/s)")
and drawn with a hollow marker. Writes `sweep.png` into the folder and prints the table with
the scaling efficiency (ops/s at N workers / (N x ops/s at 1 worker)).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from loadtest.sweep import worker_axis

WORKERS = (1, 2, 4, 8)
OPERATIONS = ("Authorize", "Authorize+Capture")
# Issue 15: PostgreSQL ledger, uniform workload, 73088ae, 16-core machine.
BEFORE: dict[str, tuple[float, ...]] = {
    "Authorize": (1357, 2043, 4331, 4814),
    "Authorize+Capture": (661, 1183, 1789, 2722),
}
PROGRESS = re.compile(
    r"service\s+(Authorize\+Capture|Authorize)\s+uniform\s*: done: [\d,]+ ops in [\d.]+s "
    r"\(([\d,]+) ops/s\)"
)


def measured(folder: Path, workers: int) -> tuple[dict[str, float], bool]:
    """Uniform-workload ops/s per operation, and whether they come from a full benchmark.json."""
    path = folder / f"b-pg-w{workers}" / "benchmark.json"
    if path.exists():
        run = json.loads(path.read_text())
        figures = {
            str(phase["operation"]): float(phase["throughput"])
            for phase in run["phases"]
            if phase["system"] == "service" and phase["workload"] == "uniform"
        }
        return figures, True
    log = (folder / "run-log-tail.txt").read_text()
    start = log.find(f"b-pg-w{workers} (limit")
    figures = {}
    if start >= 0:
        for match in PROGRESS.finditer(log, start):
            figures.setdefault(match.group(1), float(match.group(2).replace(",", "")))
    return figures, False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("folder", type=Path)
    arguments = parser.parse_args()
    folder: Path = arguments.folder

    after: dict[str, list[float | None]] = {operation: [] for operation in OPERATIONS}
    complete: list[bool] = []
    for workers in WORKERS:
        figures, full = measured(folder, workers)
        complete.append(full)
        for operation in OPERATIONS:
            after[operation].append(figures.get(operation))

    print("operation          workers  before ops/s  eff.   after ops/s  eff.   after/before")
    for operation in OPERATIONS:
        one_before, one_after = BEFORE[operation][0], after[operation][0]
        for index, workers in enumerate(WORKERS):
            old, new = BEFORE[operation][index], after[operation][index]
            new_text = "-" if new is None else f"{new:,.0f}{'' if complete[index] else '~'}"
            new_eff = "-" if new is None or not one_after else f"{new / (workers * one_after):.2f}"
            ratio = "-" if new is None else f"{new / old:.2f}×"
            print(
                f"{operation:<18} {workers:>7}  {old:>12,.0f}  {old / (workers * one_before):.2f}"
                f"   {new_text:>11}  {new_eff:>4}   {ratio}"
            )
    print("(~: from the run's progress lines; that run was cut before its table)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    colours = {"Authorize": "tab:blue", "Authorize+Capture": "tab:orange"}
    for operation in OPERATIONS:
        colour = colours[operation]
        axis.plot(
            WORKERS,
            BEFORE[operation],
            linestyle="--",
            marker="s",
            color=colour,
            alpha=0.6,
            label=f"{operation}, before (73088ae, issue 15)",
        )
        points = [
            (workers, value, full)
            for workers, value, full in zip(WORKERS, after[operation], complete, strict=True)
            if value is not None
        ]
        axis.plot(
            [workers for workers, _, _ in points],
            [value for _, value, _ in points],
            linestyle="-",
            color=colour,
            label=f"{operation}, after (bac1ce1)",
        )
        for workers, value, full in points:
            axis.plot(
                workers,
                value,
                marker="o",
                color=colour,
                markerfacecolor=colour if full else "white",
            )
    worker_axis(axis, WORKERS, "server workers (PostgreSQL ledger, uniform workload)")
    axis.set_ylabel("ops/s")
    axis.set_title("16-core machine, .devbench bundle: before and after issue 12")
    axis.legend(fontsize=8, loc="upper left")
    figure.text(
        0.99,
        0.01,
        "hollow: 8-worker run cut by the time budget, ops/s from its progress lines",
        ha="right",
        fontsize=7,
        color="grey",
    )
    figure.tight_layout()
    out = folder / "sweep.png"
    figure.savefig(out, dpi=110)
    print(f"chart: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
