"""Tests of autoseg.nets."""
