"""Patches of other libraries' behaviour, one module per library, each checked against the installed version."""
