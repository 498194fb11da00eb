"""End to end on real MSD Hippocampus (3d_fullres, shrunk patch): learning, kill -9 and --continue.

The plan is the real planner's, with the patch shrunk to 24x32x24 (``--plans`` with a
derived plan, as sweeps do) so that CPU steps take a fraction of a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from autoseg.cli import cli
from autoseg.common.jsonio import save_record
from autoseg.common.paths import Paths, TrainingId
from autoseg.planning.plan import apply_plan_overrides
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.preprocess import preprocess_dataset
from autoseg.train.checkpoint import load_checkpoint
from autoseg.train.config import TrainerConfig, apply_overrides
from autoseg.train.run import train_fold
from tests.dice_check import check_summary_against_files

DATASET = "Dataset004_Hippocampus"
SMALL_PATCH = "3d_fullres.patch_size=24,32,24"
TINY = ["iterations_per_epoch=4", "val_iterations=2", "batch_size=2", "num_workers=0", "augment.mirror=false"]
REPO = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="module")
def hippo(hippocampus_small: Paths, tmp_path_factory: pytest.TempPathFactory) -> tuple[Paths, Path]:
    """Our own preprocessed/results roots over the shared raw cases; the small-patch plan file."""
    root = tmp_path_factory.mktemp("train_hippo")
    paths = Paths(raw=hippocampus_small.raw, preprocessed=root / "preprocessed", results=root / "results")
    plan = plan_and_save(paths, DATASET, PlanRequest(configs=("3d_fullres",), progress_bar=False)).plan
    preprocess_dataset(paths, DATASET, ["3d_fullres"], plan=plan)
    plan_file = root / "small_plans.json"
    save_record(plan_file, apply_plan_overrides(plan, [SMALL_PATCH]))
    return paths, plan_file


def _cli_args(paths: Paths) -> list[str]:
    return ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]


def test_training_loss_falls_and_the_fold_is_complete(hippo) -> None:
    from autoseg.planning.store import load_plan_file

    paths, plan_file = hippo
    cfg = apply_overrides(TrainerConfig(), ["epochs=3", *TINY, "lr=0.01"])
    tid = TrainingId(DATASET, "3d_fullres", 0, variant="small")
    result = train_fold(paths, tid, cfg, load_plan_file(plan_file), device="cpu", quiet=True)
    log = [json.loads(s) for s in (result.fold_dir / "training_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert result.epochs_completed == 3 and result.best_ema_pseudo_dice is not None
    names = {p.name for p in result.fold_dir.iterdir()}
    assert {"trainer_config.json", "plans.json", "dataset.json", "progress.png", "checkpoint_latest.pt",
            "checkpoint_best.pt", "checkpoint_final.pt", "tmp", "compile_cache", ".lock"} <= names
    assert json.loads((result.fold_dir / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"][
        "patch_size"] == [24, 32, 24]
    assert result.validation_dir == result.fold_dir / "validation"  # the fold's final validation ran
    assert (result.validation_dir / "summary.json").is_file()


def test_fresh_run_starts_the_heads_at_the_label_prior(hippo) -> None:
    """One step at a negligible lr: the saved heads are still the init, whose bias is log(share)."""
    import numpy as np

    from autoseg.data.sampling import class_voxel_counts
    from autoseg.planning.store import load_plan_file
    from autoseg.splits import fold_cases, load_splits

    paths, plan_file = hippo
    plan = load_plan_file(plan_file)
    biases = {}
    for head_init in ("prior", "he"):
        cfg = apply_overrides(TrainerConfig(), ["epochs=1", *TINY, "lr=1e-12", f"head_init={head_init}"])
        tid = TrainingId(DATASET, "3d_fullres", 0, variant=f"init_{head_init}")
        result = train_fold(paths, tid, cfg, plan, device="cpu", quiet=True)
        state = load_checkpoint(result.fold_dir / "checkpoint_final.pt").model_state
        biases[head_init] = [state[k].numpy() for k in sorted(state) if k.startswith("heads.") and k.endswith("bias")]
    train_ids, _ = fold_cases(load_splits(paths, DATASET), 0)
    counts = class_voxel_counts(paths.preprocessed_data(DATASET, "3d_fullres"), train_ids, plan.num_classes)
    share = counts / counts.sum()
    assert share[0] > 0.8 and (share[1:] > 0.005).all()  # Hippocampus: small anterior/posterior
    for bias in biases["prior"]:
        np.testing.assert_allclose(bias, np.log(share), atol=1e-4)
    for bias in biases["he"]:  # nnU-Net's init: zero bias
        np.testing.assert_allclose(bias, 0.0, atol=1e-6)


def test_sigkill_then_continue_resumes_epoch_and_optimizer(hippo) -> None:
    paths, plan_file = hippo
    args = ["train", DATASET, "3d_fullres", "2", "--plans", str(plan_file), "--device", "cpu", "--quiet",
            "--set", "epochs=4", "--set", "optimizer=adamw", "--set", "lr=0.001",
            *[x for s in TINY for x in ("--set", s)]]
    fold_dir = paths.training_dir(TrainingId(DATASET, "3d_fullres", 2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "autoseg", *_cli_args(paths), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        latest, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (fold_dir / "checkpoint_latest.pt").is_file():
                latest = load_checkpoint(fold_dir / "checkpoint_latest.pt")
                if latest.epoch >= 1:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert latest is not None and 1 <= latest.epoch < 4, proc.stderr.read().decode()[-2000:]
    assert not (fold_dir / "checkpoint_final.pt").exists()

    again = CliRunner().invoke(cli, [*_cli_args(paths), *args])  # without --continue: refused
    assert again.exit_code == 2 and "use --continue" in again.stderr
    resumed = CliRunner().invoke(cli, [*_cli_args(paths), *args, "--continue"])
    assert resumed.exit_code == 0, resumed.output
    assert "trained, 4 epochs" in resumed.output
    final = load_checkpoint(fold_dir / "checkpoint_final.pt")
    assert final.epoch == 4 and [r["epoch"] for r in final.history] == [0, 1, 2, 3]
    assert final.history[: latest.epoch] == latest.history  # the epochs before the kill were kept
    steps = {float(s["step"]) for s in final.optimizer_state["state"].values()}
    # with the epochs before the kill kept (above), a fresh optimizer would count only (4 - k) * 4 steps
    assert steps == {4 * 4}
    lines = (fold_dir / "training_log.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [0, 1, 2, 3]


def test_validation_completed_on_continue_and_rerun_with_probabilities(hippo) -> None:
    """A run killed while validating gets its validation on --continue; --continue --npz adds the softmax maps."""
    from autoseg.common.jsonio import load_record
    from autoseg.dataset.io import read_image
    from autoseg.evaluate.summary import Summary
    from autoseg.infer.predict import labels_from_probabilities, load_probabilities

    paths, plan_file = hippo
    base = ["train", DATASET, "3d_fullres", "1", "--variant", "val", "--plans", str(plan_file), "--device", "cpu",
            "--quiet", "--set", "epochs=1", *[x for s in TINY for x in ("--set", s)]]

    def run(*extra: str):
        return CliRunner().invoke(cli, [*_cli_args(paths), *base, *extra])

    first = run()
    assert first.exit_code == 0, first.output
    assert "validation:" in first.output and "mean foreground Dice" in first.output
    val_dir = paths.training_dir(TrainingId(DATASET, "3d_fullres", 1, variant="val")) / "validation"
    (val_dir / "summary.json").unlink()  # as if killed while validating: checkpoint_final exists, no summary

    resumed = run("--continue")
    assert resumed.exit_code == 0, resumed.output
    assert ": validated, 1 epochs" in resumed.output and (val_dir / "summary.json").is_file()
    assert "already finished" in run("--continue").output
    assert not list(val_dir.glob("*.npz"))

    with_probs = run("--continue", "--save-probabilities")  # what train-all's validate job runs
    assert with_probs.exit_code == 0, with_probs.output
    assert ": validated, 1 epochs" in with_probs.output
    summary = load_record(val_dir / "summary.json", Summary)
    check_summary_against_files(val_dir, summary)  # its Dice is what the written masks give
    for case in summary.cases:
        probs, record = load_probabilities(val_dir, case.case_id)
        assert probs.shape[0] == 3 and record.case_id == case.case_id
        seg, _ = read_image(val_dir / f"{case.case_id}.nii.gz")
        agree = (labels_from_probabilities(probs) == seg).mean()
        assert agree > 0.99  # the maps made the masks (up to float16 rounding of near-ties)
    assert "already finished" in run("--continue", "--save-probabilities").output
    again = run("--validation-only")  # always re-runs; the new folder replaces the old one whole
    assert again.exit_code == 0 and ": validated, 1 epochs" in again.output
    assert (val_dir / "summary.json").is_file() and not list(val_dir.glob("*.npz"))
    assert not (val_dir.parent / ".validation.partial").exists()

    refused = CliRunner().invoke(cli, [*_cli_args(paths), "train", DATASET, "3d_fullres", "3", "--validation-only"])
    assert refused.exit_code == 2 and "checkpoint_final.pt not found" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_torchrun_two_cpu_processes_train_one_model(hippo) -> None:
    """``torchrun --nproc-per-node 2 -m autoseg train``: gloo on the CPU, rank 0 alone writes and prints."""
    paths, plan_file = hippo
    args = ["train", DATASET, "3d_fullres", "4", "--variant", "ddp", "--plans", str(plan_file), "--device", "cpu",
            "--quiet", "--set", "epochs=2", *[x for s in TINY for x in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "autoseg", *_cli_args(paths), *args], env=env, capture_output=True, text=True, encoding="utf-8",
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(": trained, 2 epochs") == 1  # one result line: rank 0's
    fold_dir = paths.training_dir(TrainingId(DATASET, "3d_fullres", 4, variant="ddp"))
    final = load_checkpoint(fold_dir / "checkpoint_final.pt")
    assert final.epoch == 2 and final.trainer_config.batch_size == 2  # the global batch, split 1 + 1
    lines = (fold_dir / "training_log.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [0, 1]  # written once, not once per rank
    assert (fold_dir / "validation" / "summary.json").is_file()
