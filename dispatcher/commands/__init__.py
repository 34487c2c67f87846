"""Operator commands: the ``dispatcher`` CLI and what its subcommands manage.

Subscriptions, dead letters and replay, send-test, topics and groups. The
management API calls the same functions, so both share one code path.
"""
