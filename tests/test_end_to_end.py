"""The whole pipeline through the CLI on real Hippocampus cases, on the CPU:
plan -> preprocess -> train (tiny schedule, validation at the end) -> evaluate the same predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths
from autoseg.dataset.io import read_image
from autoseg.evaluate.summary import Summary
from tests.helpers import run_cli_ok

DATASET = "Dataset004_Hippocampus"
TINY = ["epochs=2", "iterations_per_epoch=3", "val_iterations=1", "batch_size=2", "num_workers=0"]



def test_plan_preprocess_train_validate_evaluate(hippocampus_small: Paths, tmp_path: Path) -> None:
    paths = Paths(raw=hippocampus_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "res")
    # a smaller patch keeps the CPU steps short; everything else is the planned network
    run_cli_ok(paths, "plan", "4", "--configs", "3d_fullres", "--set", "3d_fullres.patch_size=24,32,24")
    run_cli_ok(paths, "preprocess", "4", "--configs", "3d_fullres")
    run_cli_ok(paths, "train", "4", "3d_fullres", "0", "--quiet", "--device", "cpu",
         *[a for kv in TINY for a in ("--set", kv)])

    fold = paths.results / DATASET / "3d_fullres" / "default" / "fold_0"
    assert (fold / "checkpoint_final.pt").is_file() and (fold / "progress.png").is_file()
    log = [json.loads(line) for line in (fold / "training_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1] or [entry["epoch"] for entry in log] == [1, 2]

    validation = fold / "validation"
    val_summary = load_record(validation / "summary.json", Summary)
    splits = json.loads((paths.preprocessed / DATASET / "splits.json").read_text(encoding="utf-8"))
    val_cases = sorted(c.case_id for c in val_summary.cases)
    assert val_cases == sorted(splits["folds"][0]["val"])
    for case in val_cases:  # predictions in the raw images' own geometry
        pred, pg = read_image(validation / f"{case}.nii.gz")
        _, rg = read_image(paths.raw / DATASET / "labelsTr" / f"{case}.nii.gz")
        assert pg.same_grid(rg) and pred.shape == rg.shape

    out = tmp_path / "evaluate_summary.json"
    run_cli_ok(paths, "evaluate", "--pred", str(validation), "--ref", str(paths.raw / DATASET / "labelsTr"),
         "-d", "4", "--allow-missing", "-o", str(out))
    again = load_record(out, Summary)
    assert again.foreground_mean.dice == val_summary.foreground_mean.dice
    assert {k: v.dice for k, v in again.mean.items()} == {k: v.dice for k, v in val_summary.mean.items()}
