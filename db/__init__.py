"""PostgreSQL layer: models, sessions, migrations and partition helpers."""
