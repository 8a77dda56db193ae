"""The `ep` command: one file per command group; each command parses, builds a config, calls one function."""
