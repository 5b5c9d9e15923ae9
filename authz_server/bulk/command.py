"""`medwallet-authz load-csv`: the command-line face of the bulk loader."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from authz_server.bulk import csv_formats
from authz_server.bulk.csv_formats import Kind
from authz_server.settings import Settings

HELP = "bulk-load participants, credits, merchants, items and relationships from CSV files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = csv_formats.__doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for kind in Kind:
        parser.add_argument(
            f"--{kind.value}", type=Path, metavar="CSV", help=f"the {kind.value} file"
        )
    parser.add_argument(
        "--batch-size", type=int, default=5000, help="rows per transaction (default 5000)"
    )
    parser.add_argument(
        "--rejects", type=Path, metavar="CSV", help="write every rejected row here (file,line,...)"
    )


def run(arguments: argparse.Namespace, settings: Settings) -> int:
    """Loads the files given; 0 if every row loaded, 1 if any was rejected, 2 on bad usage."""
    from authz_server.bulk.loader import BulkLoader

    files = [(kind, path) for kind in Kind if (path := getattr(arguments, kind.value)) is not None]
    if not files:
        options = ", ".join(f"--{kind.value}" for kind in Kind)
        print(f"load-csv: give at least one of {options}", file=sys.stderr)
        return 2
    missing = [str(path) for _, path in files if not path.is_file()]
    if missing:
        print(f"load-csv: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if arguments.batch_size < 1:
        print("load-csv: --batch-size must be positive", file=sys.stderr)
        return 2
    rejects = arguments.rejects.open("w", newline="") if arguments.rejects else None
    try:
        with BulkLoader(
            settings.effective_database_url,
            allowed_relations=settings.allowed_relations,
            batch_size=arguments.batch_size,
            rejects=rejects,
        ) as loader:
            report = loader.load(files)
    finally:
        if rejects is not None:
            rejects.close()
    print(report.summary())
    return 1 if report.rejected else 0
