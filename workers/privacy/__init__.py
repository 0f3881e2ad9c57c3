"""Data protection: erasure and export of a user's data, tombstones, scrubbing of archives.

- `tombstones.py`: the HMAC refs that name an erased user, and the tombstone table
  (owner of `erasure_tombstones` and `erasure_keys`);
- `erasure.py`: every table that can hold a user's data and what erasure does to it
  (the registry a test holds against the live schema), `forget` and `export`;
- `archives.py`: tombstones applied to the audit archives `fleet retention` writes,
  and to archives already written (`fleet retention scrub-archives`).
"""
