"""`python -m edgefleet` runs the `edgefleet` command."""

from edgefleet.cli import main

main()
