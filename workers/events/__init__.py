"""User events: the envelope, producers, the outbox and ingest."""
