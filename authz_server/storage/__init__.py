"""Storage adapters: SQL (system of record) and Redis (hot state)."""
