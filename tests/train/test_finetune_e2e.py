"""Fine-tuning end to end through the CLI: pretrain, ``plan --from-plans``, ``train --pretrained``, resume.

Real MSD Hippocampus cases (read in place) and a generated phantom; networks shrunk with plan
overrides so that every CPU step takes a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from autoseg.cli import cli
from autoseg.common.jsonio import save_record
from autoseg.common.paths import Paths
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.nets.unet import build_unet
from autoseg.planning.plan import apply_plan_overrides
from autoseg.planning.store import load_plan
from autoseg.train.checkpoint import FINAL, LATEST, load_checkpoint, save_checkpoint
from tests.helpers import HIPPOCAMPUS_MISSING, hippocampus_available, hippocampus_case_ids, link_hippocampus_subset
from tests.helpers import run_cli_ok

pytestmark = pytest.mark.skipif(not hippocampus_available(), reason=HIPPOCAMPUS_MISSING)

PHANTOM, HIPPO, HIPPO_B = "Dataset999_Phantom", "Dataset004_Hippocampus", "Dataset005_HippocampusB"
TINY = ["epochs=1", "iterations_per_epoch=3", "val_iterations=1", "num_workers=0", "final_validation=off",
        "augment.mirror=false"]


def sets(*pairs: str) -> list[str]:
    return [a for kv in pairs for a in ("--set", kv)]


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom (1 channel, 3 classes like Hippocampus) and two disjoint sets of 12 real Hippocampus cases."""
    raw = tmp_path_factory.mktemp("finetune") / "raw"
    make_phantom_dataset(raw, PhantomRecipe(num_training=8, num_test=0, shape=(12, 40, 40), shape_jitter=4))
    ids = hippocampus_case_ids(24)
    link_hippocampus_subset(raw, ids[:12], name=HIPPO)
    link_hippocampus_subset(raw, ids[12:], name=HIPPO_B)
    return raw


def invoke_error(paths: Paths, *args: str) -> str:
    """Run the CLI expecting a user error: exit 2 and exactly one ``error:`` line, which is returned."""
    roots = ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]
    result = CliRunner().invoke(cli, [*roots, *args])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    return errors[0]


def fold_dir(paths: Paths, dataset: str, variant: str = "default") -> Path:
    return paths.results / dataset / "3d_fullres" / variant / "fold_0"


@pytest.mark.slow
def test_pretrain_on_the_phantom_finetune_on_hippocampus(raw_root: Path, tmp_path: Path) -> None:
    paths = Paths(raw=raw_root, preprocessed=tmp_path / "pp", results=tmp_path / "res")
    run_cli_ok(paths, "plan", "999", "--configs", "3d_fullres", *sets("3d_fullres.features_per_stage=8,16,32,64"))
    run_cli_ok(paths, "preprocess", "999", "--configs", "3d_fullres")
    run_cli_ok(paths, "train", "999", "3d_fullres", "0", "--quiet", "--device", "cpu", *sets(*TINY))
    source = tmp_path / "phantom_final.pt"  # a copy, so that the test can take it away later
    shutil.copyfile(fold_dir(paths, PHANTOM) / FINAL, source)

    out = run_cli_ok(paths, "plan", "4", "--from-plans", PHANTOM)
    assert f"configurations (transpose, spacing, patch, batch, topology) of {PHANTOM}" in out
    plan, phantom_plan = load_plan(paths, HIPPO), load_plan(paths, PHANTOM)
    assert plan.transferred_from == PHANTOM and plan.labels != phantom_plan.labels
    mine, theirs = plan.configuration("3d_fullres"), phantom_plan.configuration("3d_fullres")
    assert (mine.spacing, mine.patch_size, mine.strides, mine.features_per_stage) == (
        theirs.spacing, theirs.patch_size, theirs.strides, theirs.features_per_stage)
    run_cli_ok(paths, "preprocess", "4", "--configs", "3d_fullres")

    run_cli_ok(paths, "train", "4", "3d_fullres", "0", "--quiet", "--device", "cpu", "--pretrained", str(source),
               *sets(*TINY))
    fold = fold_dir(paths, HIPPO)
    final = load_checkpoint(fold / FINAL)
    assert final.pretrained_from is not None and final.pretrained_from["path"] == str(source.resolve())
    assert (final.pretrained_from["dataset"], final.pretrained_from["heads"]) == (PHANTOM, "copied")
    assert json.loads((fold / "trainer_config.json").read_text())["pretrained"] == str(source.resolve())

    # --pretrained starts runs only
    line = invoke_error(paths, "train", "4", "3d_fullres", "0", "--continue", "--pretrained", str(source))
    assert line.startswith("error: --pretrained: --pretrained starts a run") and "plain --continue" in line

    # as train-all / sweep jobs run it: --continue on a fresh fold with the trainer key starts from the weights
    run_cli_ok(paths, "train", "4", "3d_fullres", "0", "--quiet", "--device", "cpu", "--variant", "job",
               "--continue", *sets(*TINY, f"pretrained={source}"))
    assert load_checkpoint(fold_dir(paths, HIPPO, "job") / FINAL).pretrained_from == final.pretrained_from

    # a fine-tuned run killed in its first epoch resumes from its own checkpoint, without the source
    save_checkpoint(fold / LATEST, dataclasses.replace(final, epoch=0, history=[]))
    (fold / FINAL).unlink()
    source.unlink()
    run_cli_ok(paths, "train", "4", "3d_fullres", "0", "--quiet", "--device", "cpu", "--continue")
    resumed = load_checkpoint(fold / FINAL)
    assert resumed.epoch == 1 and resumed.pretrained_from == final.pretrained_from


def test_mismatching_checkpoints_are_one_line_errors(raw_root: Path, tmp_path: Path) -> None:
    paths = Paths(raw=raw_root, preprocessed=tmp_path / "pp", results=tmp_path / "res")
    run_cli_ok(paths, "plan", "999", "--configs", "3d_fullres", *sets("3d_fullres.features_per_stage=8,16,32,64"))
    run_cli_ok(paths, "preprocess", "999", "--configs", "3d_fullres")
    run_cli_ok(paths, "train", "999", "3d_fullres", "0", "--quiet", "--device", "cpu", *sets(*TINY))
    source = fold_dir(paths, PHANTOM) / FINAL
    plan = load_plan(paths, PHANTOM)

    wider = tmp_path / "wider_plans.json"  # the same data, a wider bottleneck: another topology
    save_record(wider, apply_plan_overrides(plan, ["3d_fullres.features_per_stage=8,16,32,128"]))
    line = invoke_error(paths, "train", "999", "3d_fullres", "0", "--variant", "wide", "--plans", str(wider),
                        "--pretrained", str(source), *sets(*TINY))
    assert line.startswith(f"error: {source}: layer encoder.3.0.weight has shape (64, 32, 3, 3, 3) in the "
                           f"pretrained network ({PHANTOM} 3d_fullres) and (128, 32, 3, 3, 3) here")
    assert not fold_dir(paths, PHANTOM, "wide").exists()  # refused before anything was written

    ckpt = load_checkpoint(source)
    two = build_unet(plan.configuration("3d_fullres"), 2, 3)
    two_channels = save_checkpoint(tmp_path / "two_channels.pt", dataclasses.replace(
        ckpt, model_state=two.state_dict(), num_input_channels=2))
    line = invoke_error(paths, "train", "999", "3d_fullres", "0", "--variant", "two", "--pretrained",
                        str(two_channels), *sets(*TINY))
    assert "takes 2 input channel(s), this one 1: first conv encoder.0.0.weight has shape (8, 2, 1, 3, 3)" in line

    line = invoke_error(paths, "plan", "4", "--from-plans", "Dataset123_Nothing")
    assert "no plan yet; run `autoseg plan Dataset123_Nothing` first" in line


@pytest.mark.slow
def test_finetuned_loss_starts_lower_than_from_scratch(raw_root: Path, tmp_path: Path) -> None:
    """Pretrained on 12 other Hippocampus cases, the first epoch's loss is far below a fresh network's.

    (Pretrained on the phantom it is not: that network confidently segments the wrong structures,
    docs/training.md has the figures.)
    """
    paths = Paths(raw=raw_root, preprocessed=tmp_path / "pp", results=tmp_path / "res")
    run_cli_ok(paths, "plan", "5", "--configs", "3d_fullres",
               *sets("3d_fullres.patch_size=24,32,24", "3d_fullres.features_per_stage=8,16,32"))
    run_cli_ok(paths, "preprocess", "5", "--configs", "3d_fullres")
    run_cli_ok(paths, "train", "5", "3d_fullres", "0", "--quiet", "--device", "cpu",
               *sets(*TINY, "epochs=5", "iterations_per_epoch=8"))
    run_cli_ok(paths, "plan", "4", "--from-plans", "5")
    run_cli_ok(paths, "preprocess", "4", "--configs", "3d_fullres")
    first_loss = {}
    for variant, extra in (("scratch", []), ("finetuned", ["--pretrained", str(fold_dir(paths, HIPPO_B) / FINAL)])):
        run_cli_ok(paths, "train", "4", "3d_fullres", "0", "--quiet", "--device", "cpu", "--variant", variant,
                   *extra, *sets(*TINY, "iterations_per_epoch=5"))
        log = (fold_dir(paths, HIPPO, variant) / "training_log.jsonl").read_text().splitlines()
        first_loss[variant] = json.loads(log[0])["train_loss"]
    assert first_loss["finetuned"] < first_loss["scratch"] - 0.1, first_loss
