"""Bulk loading of the registry (participants, credits, merchants, items, relationships) from CSV.

See `csv_formats` for the files and `loader` for what a load guarantees.
"""

from authz_server.bulk.csv_formats import Kind
from authz_server.bulk.loader import BulkLoader, FileReport, LoadReport, Rejection

__all__ = ["BulkLoader", "FileReport", "Kind", "LoadReport", "Rejection"]
