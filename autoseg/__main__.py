"""`python -m autoseg ...` is the same as the `autoseg` console script (torchrun uses this)."""

from autoseg.cli import main

if __name__ == "__main__":
    main()
