"""Planning stage: fingerprint + GPU memory budget -> plans.json (see docs/planning.md).

Modules, each importing only those before it: ``plans.py`` holds the persisted
`Plan`/`Configuration`; ``memory.py`` the memory model; ``presets.py`` the planner presets
(default, resenc-m/l/xl) the rules are parametrized by; ``rules.py`` the pure nnU-Net rules with
their constants; ``store.py`` reads and writes plans.json (`save_plan`, `load_plan`,
`resolve_plans`); ``plan.py`` composes the rules (`plan_dataset`, `apply_plan_overrides`);
``transfer.py`` takes another dataset's plans (``--from-plans``); ``planner.py`` is what
``autoseg plan`` runs (`plan_and_save`). Import from those modules directly; this package
imports nothing so that reading a plan does not pull in image IO.
"""
