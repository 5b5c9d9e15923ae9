"""Summarizes a py-spy raw profile (collapsed stacks): where the samples are, by function.

    python -m loadtest.profile_summary loadtest/results/profile-service-authorize-uniform.txt

Prints the functions holding the most samples inclusively (anywhere on the stack) and by
self time (the innermost frame), so a hot path's cost can be read without a flame-graph viewer.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LOCATION = re.compile(r" \((?P<file>[^():]+):\d+\)$")


def frame_name(frame: str) -> str:
    """'encode (authz_server/server/convert.py:42)' -> 'encode (authz_server/server/convert.py)'"""
    match = _LOCATION.search(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{frame[: match.start()]} ({path})"


# Where a sample of the service belongs: the first category any of whose markers is on its
# stack (so the journal's SQL counts as journal, not as SQL in general).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("capture: SQL group commit (SQLAlchemy ORM + driver)", ("GroupCommit._commit",)),
    ("journal of decisions (SQL insert)", ("Journal.",)),
    ("merchant/catalog cache reload", ("ReferenceCache.",)),
    ("hold sweeper (SCAN + expire script)", ("Application._sweep", "HoldStore.sweep")),
    ("access log + metrics", ("logging/", "prometheus_client", "Logger.")),
    ("Redis client (redis-py asyncio)", ("redis/asyncio", "redis/commands", "guarded (")),
    (
        "handlers, rules, protobuf building",
        (
            "authz_server/server/",
            "authz_server/service/",
            "authz_server/domain/",
            "authz_server/storage/",
        ),
    ),
    ("event loop in epoll_wait (idle or I/O)", ("leaf:EpollSelector.select",)),
    ("gRPC core, asyncio machinery, protobuf C (the rest)", ("",)),
)


def categorize(path: Path) -> list[tuple[str, float]]:
    """Share of the samples per category of CATEGORIES."""
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        total += int(count_text)
        leaf = stack.rsplit(";", 1)[-1]
        for label, markers in CATEGORIES:
            if any(
                marker.removeprefix("leaf:") in (leaf if marker.startswith("leaf:") else stack)
                for marker in markers
            ):
                counts[label] += int(count_text)
                break
    return [(label, counts[label] / total if total else 0.0) for label, _ in CATEGORIES]


def summarize(path: Path, top: int = 25) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [frame_name(f) for f in stack.split(";") if f]
        for name in set(frames):
            inclusive[name] += count
        if frames:
            own[frames[-1]] += count
            innermost = frames[-1]
            files[innermost[innermost.rfind("(") + 1 : -1].split("/")[0]] += count
    if not total:
        return f"{path}: no samples"
    lines = [f"{path.name}: {total:,} samples", "", "by part of the service:"]
    for label, share in categorize(path):
        lines.append(f"  {share:6.1%}  {label}")
    lines += ["", "inclusive (on the stack):"]
    for name, count in inclusive.most_common(top):
        lines.append(f"  {count / total:6.1%}  {name}")
    lines += ["", "self (innermost frame):"]
    for name, count in own.most_common(top):
        lines.append(f"  {count / total:6.1%}  {name}")
    lines += ["", "self time by top-level package:"]
    for name, count in files.most_common(12):
        lines.append(f"  {count / total:6.1%}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profiles", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=25)
    arguments = parser.parse_args(argv)
    for path in arguments.profiles:
        print(summarize(path, arguments.top))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
