"""`python -m jobstream` is the `jobstream` command."""

from jobstream._cli import main

main()
