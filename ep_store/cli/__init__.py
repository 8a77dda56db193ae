"""The `ep` command: one file per command group; each command parses, builds a config, calls one function.

The click group ``main`` and the entry point are ``ep_store.cli.main:main``; cli/base.py holds
what the command files share. (``main`` is not re-exported here: the package attribute would
hide the module ``ep_store.cli.main`` from ``import ep_store.cli.main as m``.)
"""
