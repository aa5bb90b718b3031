"""`python -m sweep.imatrix out=PATH [overrides]`: see sweep/imatrix/compute.py."""

from .compute import main

main()
