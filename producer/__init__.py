"""The producer: catalogues in, ledger rows and render messages out, and the ops CLI.

It never imports ``worker``; it sends tasks by the names in ``schemas.names``.
"""
