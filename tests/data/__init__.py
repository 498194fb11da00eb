"""Tests of autoseg.data."""
