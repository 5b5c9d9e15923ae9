"""The system of record in SQL (SQLite by default, PostgreSQL in production)."""
