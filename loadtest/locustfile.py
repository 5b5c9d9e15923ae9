"""Locust load test of MedWallet AuthZ: the weighted mix of real traffic (see scenarios.py).

    locust -f loadtest/locustfile.py --host 127.0.0.1:50051 --headless -u 200 -r 20 -t 2m \
        --csv loadtest/out/mix --data-dir loadtest/out/data --tokens-file data/tokens.json

The hot spot (many tills charging one family) is loadtest/locustfile_hotspot.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.scenarios import (
    FamilyApp,
    HospitalCashier,
    PharmacyTill,
    PremiumCollector,
)

__all__ = ["FamilyApp", "HospitalCashier", "PharmacyTill", "PremiumCollector"]
