"""``python -m lightning_taylor.cli``: the ``lightning-taylor`` command."""

from lightning_taylor.cli import main

main()
