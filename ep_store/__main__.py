"""`python -m ep_store` is the `ep` command."""

from ep_store.cli.main import main

main()
