"""Conditions and segment memberships: the rules that decide what the fleet does."""
