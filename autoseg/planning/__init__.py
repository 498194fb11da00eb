"""Planning stage: fingerprint + GPU memory budget -> plans.json (see docs/planning.md).

``plans.py`` holds the persisted `Plan`/`Configuration`; ``rules.py`` the pure nnU-Net rules
with their constants; ``memory.py`` the memory model; ``presets.py`` the planner presets
(default, resenc-m/l/xl) the rules are parametrized by; ``plan.py`` composes them
(`plan_dataset`, `apply_plan_overrides`, `save_plan`, `load_plan`, `plan_and_save`).
Import from those modules directly; this package imports nothing so that reading a plan
does not pull in image IO.
"""
