"""The hot state in Redis: quotas and holds, changed only by the Lua scripts in lua/. A map:

- keys.py: every key name and SCAN pattern (and the key suffixes the scripts build);
- lua/: the scripts; _generation.lua and _lib.lua are prepended to them (scripts.py loads them);
- script_io.py, quota_io.py: each script's KEYS/ARGV and reply as one typed call, and the
  authorization hash's fields (hold_record, hold_fields);
- hold_store.py: authorizations and holds, one call at a time (service/ports.HoldStore);
- quota_cache.py: quotas (service/ports.QuotaCache);
- sweep_store.py, sweeper.py: the sweeper's indexes, its rounds and the full SCAN passes;
- scans.py: what runs on every primary (SCAN, DBSIZE, SCRIPT LOAD) and slot-safe UNLINK;
- generation.py, rebuild_writer.py: the hot state's generation and its rebuild from SQL;
- retention.py: dropping closed months' idempotency records; rate_limiter.py: per-principal
  limits (not hot state);
- pipelined.py: the connection every command goes through.

Every key of one beneficiary carries the hash tag {b:<8 hex of sha1(beneficiary)>}, so one
script only ever touches one Cluster slot.
"""
