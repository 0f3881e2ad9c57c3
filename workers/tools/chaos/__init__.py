"""Fault injection and load on scratch fleets: `fleet chaos`, `fleet bench soak` (RELIABILITY.md)."""
