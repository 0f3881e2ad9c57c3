"""Thin Celery task modules, one per concern: unpack ids, call a typed service function."""
