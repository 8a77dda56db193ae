"""`python -m ep_store` is the `ep` command."""

from ep_store.cli import main

main()
