"""`python -m hetforge.cli`: the same as the `hetforge` command."""

from hetforge.cli import main

main()
