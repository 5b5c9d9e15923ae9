"""A serving worker hides its start-up objects from the cyclic collector and collects its youngest
generation less often (runtime/serving.py, settle_garbage_collector): full collections walked
every object start-up made, a pause that showed in the tail latency (loadtest/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import gc
from authz_server.runtime import serving
assert gc.get_freeze_count() == 0
before = gc.get_threshold()
serving.settle_garbage_collector()
frozen = gc.get_freeze_count()
threshold = gc.get_threshold()
print(frozen, threshold[0], threshold[1:] == before[1:], serving.GC_YOUNG_THRESHOLD)
"""


def test_start_up_objects_are_frozen_and_the_young_generation_threshold_is_raised() -> None:
    # A process of its own: freezing the test session's objects would change other tests.
    out = subprocess.run(
        [sys.executable, "-c", CHILD], check=True, capture_output=True, text=True, timeout=60
    ).stdout.split()
    frozen, young, older_kept, wanted = int(out[0]), int(out[1]), out[2], int(out[3])
    # the imported service (grpc, SQLAlchemy, protobuf) is tens of thousands of objects
    assert frozen > 10_000
    assert young == wanted > 700
    assert older_kept == "True"
