"""Locust hot spot: every simulated till charges the same family (a pharmacy basket, then the
capture), as when one relative's quota is hit from many tills at once.

    locust -f loadtest/locustfile_hotspot.py --host 127.0.0.1:50051 --headless -u 100 -r 50 \
        -t 1m --csv loadtest/out/hotspot --data-dir loadtest/out/data --tokens-file data/tokens.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.scenarios import HotSpotTill

__all__ = ["HotSpotTill"]
