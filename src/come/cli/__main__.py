"""`python -m come.cli ...`: the same as the `come` command."""

from . import main

main()
