"""Secrets stored encrypted per workspace: the keys and cipher (`crypto`), the table (`store`).

Only the actions worker (at send time) and `fleet secret` decrypt; see README "Secrets".
"""
