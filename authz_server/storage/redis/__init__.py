"""The hot state in Redis: quotas and holds, changed only by the Lua scripts in lua/.

Every key of one beneficiary carries the hash tag {b:<beneficiary_id>}, so one script only ever
touches one Cluster slot.
"""
