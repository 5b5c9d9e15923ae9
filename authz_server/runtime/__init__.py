"""Process-level plumbing: the private Redis, start-up, reconcile, demo data."""
