"""The sweep language: one YAML file -> a validated grid of variants -> derived plans and jobs -> a run.

`spec` holds the records (`SweepSpec`, `Variant`) and naming rules, `parse` reads and validates a
file (`load_sweep`), `jobs` turns a spec into derived plans, the job graph and ``sweep.json``, and
`run` records and runs it through the scheduler. The file-level API is re-exported here.
"""

from autoseg.schedule.sweep.parse import load_sweep, parse_sweep
from autoseg.schedule.sweep.spec import (BASELINE_NAME, MAX_VARIANT_NAME_CHARS, SweepSpec, Variant, canonical_json,
                                         format_value, name_value, safe_name, split_preset)

__all__ = ["BASELINE_NAME", "MAX_VARIANT_NAME_CHARS", "SweepSpec", "Variant", "canonical_json", "format_value",
           "load_sweep", "name_value", "parse_sweep", "safe_name", "split_preset"]
