"""`python -m sweep.recipe ...`: see sweep/recipe/command.py."""

from .command import main

main()
