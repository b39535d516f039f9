"""``python -m chanprune`` (and ``torchrun -m chanprune``): the command line."""

from .cli import main

main()
