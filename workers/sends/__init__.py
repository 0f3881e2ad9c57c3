"""The send gateway: every message to a user passes here (consent, caps, send windows, holdouts)."""
