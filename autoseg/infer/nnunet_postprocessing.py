"""nnU-Net's postprocessing.json -> the postprocessing of an autoseg best.json (never postprocessing.pkl).

nnU-Net decides its postprocessing on the cross-validation predictions and writes it twice,
``postprocessing.pkl`` (the functions themselves, pickled: loading it could run any code) and
``postprocessing.json`` (their names and arguments, for reading). The import reads only the
json: ``remove_all_but_largest_component_from_segmentation`` on all foreground labels first
(autoseg's ``keep_largest_foreground``), then on single labels (``keep_largest_classes``) or
label tuples (regions, ``keep_largest_regions``), in that order, which is also the order
`autoseg.evaluate.postprocess.apply_postprocessing` applies them in.

best.json belongs to the evaluate stage, which prediction sits below; its record is written
here as plain JSON in `autoseg.evaluate.best.BestConfig`'s layout (tests load it with
`load_best`, so the two cannot drift apart).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import read_json
from autoseg.dataset.spec import LabelScheme

PP_JSON = "postprocessing.json"
PP_PICKLE = "postprocessing.pkl"
LARGEST_COMPONENT_FN = "remove_all_but_largest_component_from_segmentation"
"""The only postprocessing function nnU-Net's find_best_configuration adopts."""

BEST_SCHEMA = "autoseg.best_config"
BEST_VERSION = 1
"""`autoseg.evaluate.best.BestConfig`'s SCHEMA and VERSION."""


def find_postprocessing(folder: Path, folds: Sequence[int | str]) -> tuple[Path | None, list[str]]:
    """postprocessing.json of a trainer folder (its own, or its cross-validation folder's) and notes.

    nnU-Net writes it to ``crossval_results_folds_<folds>/``; the one of exactly the imported
    folds is preferred. A postprocessing.pkl is mentioned, never opened.
    """
    folder = Path(folder)
    wanted = folder / f"crossval_results_folds_{'_'.join(str(f) for f in folds)}"
    candidates = [folder, wanted, *sorted(p for p in folder.glob("crossval_results_folds_*") if p != wanted)]
    notes: list[str] = []
    found = next((c / PP_JSON for c in candidates if (c / PP_JSON).is_file()), None)
    pickles = [c / PP_PICKLE for c in candidates if (c / PP_PICKLE).is_file()]
    if pickles:
        if found is not None:
            notes.append(f"{pickles[0]} is not unpickled (loading it could run code); using {found} instead")
        else:
            notes.append(f"{pickles[0]} is not unpickled (loading it could run code) and has no {PP_JSON} twin: "
                         "imported without postprocessing")
    if found is not None and found.parent != wanted and found.parent != folder:
        notes.append(f"postprocessing from {found.parent.name}, not from the imported folds {list(folds)}")
    return found, notes


def rules_from_postprocessing(data: Mapping[str, Any], scheme: LabelScheme, where: object) -> dict[str, Any]:
    """`PostprocessingRules` fields (as JSON) of nnU-Net's postprocessing.json."""
    fns, kwargs = data.get("postprocessing_fns"), data.get("postprocessing_kwargs")
    if not isinstance(fns, list) or not isinstance(kwargs, list) or len(fns) != len(kwargs):
        raise AutosegError("postprocessing_fns and postprocessing_kwargs must be lists of the same length", where)
    foreground = sorted(v for v in scheme.label_values if v != 0)
    rules: dict[str, Any] = {"keep_largest_foreground": False, "keep_largest_classes": [],
                             "keep_largest_regions": []}
    for i, (fn, kw) in enumerate(zip(fns, kwargs)):
        if fn != LARGEST_COMPONENT_FN:
            raise AutosegError(f"postprocessing function {fn!r}: autoseg knows only {LARGEST_COMPONENT_FN}", where)
        target = (kw or {}).get("labels_or_regions")
        if isinstance(target, list) and i == 0 and sorted(int(v) for v in target) == foreground:
            # all foreground labels at once; for regions the same as the region of every label
            rules["keep_largest_foreground"] = True
        elif isinstance(target, int) or (isinstance(target, list) and len(target) == 1 and not scheme.has_regions):
            rules["keep_largest_classes"].append(int(target if isinstance(target, int) else target[0]))
        elif isinstance(target, list) and scheme.has_regions:
            rules["keep_largest_regions"].append(sorted(int(v) for v in target))
        else:
            raise AutosegError(f"postprocessing step {i}: labels_or_regions {target!r} fits no label of "
                               f"dataset.json", where)
    return rules


def _dice(section: Any) -> float:
    try:
        value = float(section["foreground_mean"]["Dice"])
    except (KeyError, TypeError, ValueError):
        return math.nan
    return value


def _class_key(key: str) -> int | str:
    return int(key) if key.lstrip("-").isdigit() else key


def best_record(dataset: str, config_dirname: str, folds: Sequence[int], checkpoint: str,
                pp_file: Path, scheme: LabelScheme) -> dict[str, Any]:
    """best.json's record for an imported configuration and its nnU-Net postprocessing."""
    data = read_json(pp_file)
    if not isinstance(data, dict):
        raise AutosegError("expected a JSON object", pp_file)
    rules = rules_from_postprocessing(data, scheme, pp_file)
    after = data.get("postprocessed", {})
    per_class = {}
    for key, value in (after.get("mean") or {}).items() if isinstance(after, dict) else ():
        if isinstance(value, dict) and "Dice" in value:
            per_class[str(_class_key(str(key)))] = float(value["Dice"])
    return {"schema": BEST_SCHEMA, "schema_version": BEST_VERSION, "dataset": dataset, "configs": [config_dirname],
            "folds": [int(f) for f in folds], "variant": "default", "checkpoint": checkpoint,
            "postprocessing": rules, "cv_dice": _none_if_nan(_dice(data.get("input_folder"))),
            "cv_dice_postprocessed": _none_if_nan(_dice(after)), "class_dice_postprocessed": per_class,
            "candidates": []}


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value
