"""`python -m alexnet ...` is `ablate ...`, for machines where the console script is not
installed (the project run from its source tree)."""

from alexnet.cli import main

main()
