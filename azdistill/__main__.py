"""`python -m azdistill`: the same command line as `azdistill`."""

from azdistill.cli import main

main()
