"""MedWallet AuthZ: real-time authorization of payments from shared medical-insurance quota."""

__version__ = "0.1.0"
