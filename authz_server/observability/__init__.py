"""Metrics, logs and health: what SREs watch."""
