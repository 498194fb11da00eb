"""Pieces every stage shares: paths, atomic JSON records, errors, progress bars."""
