"""autoseg's predictor against nnU-Net's nnUNetPredictor on the same weights: CPU-seconds, wall, peak RSS, masks.

One randomly initialised 3d_fullres network of the planned topology (full width; speed and
memory do not depend on the weights) is written as an nnU-Net model folder (plans.json,
dataset.json, fold_0/checkpoint_final.pth of nnU-Net's PlainConvUNet) and imported with
`autoseg.infer.nnunet_import.import_nnunet`, as a user would with ``autoseg import-nnunet``. Each
predictor then segments the same input folder in its own child process, so its CPU time
(user + system, the child and its own children) and peak RSS (ru_maxrss of the child and,
separately, of its children: nnU-Net's preprocessing and export workers) are its own.
Agreement is the fraction of equal voxels per case.

    python benchmarks/bench_predict_vs_nnunet.py [--cases 52] [--tta on|off|both] [--threads 1]
                                                 [--compile off,auto] [--whole]
    python benchmarks/bench_predict_vs_nnunet.py --large [--large-shape 400 512 512] [--estimate-only]

Hippocampus: the first ``--cases`` fold-0 validation cases (autoseg's 5-fold split, nnU-Net's
seed), planned on all 260 training cases. ``--large``: a generated CT-like case (14 foreground
classes, ellipsoids in a noisy body) planned as its own one-case dataset; ``--estimate-only``
prints both predictors' memory estimates for it without running them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LARGE_CLASSES = 14
"""Foreground classes of the generated CT-like case (the issue's total-segmentator-like load)."""


# --------------------------------------------------------------------------- model folders


def nnunet_plans(plan, config, dataset_json: dict) -> dict:
    """An nnU-Net 2.x plans.json describing autoseg's plan (zscore MRI or CT normalization)."""
    n = len(config.features_per_stage)
    norm = {"zscore": "ZScoreNormalization", "ct": "CTNormalization", "none": "NoNormalization"}
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n, "features_per_stage": list(config.features_per_stage),
                            "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [list(k) for k in config.kernel_sizes],
                            "strides": [list(s) for s in config.strides], "n_conv_per_stage": [2] * n,
                            "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    resampling = "resample_data_or_seg_to_shape"
    cfg = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
           "batch_size": config.batch_size, "patch_size": list(config.patch_size),
           "median_image_size_in_voxels": list(config.median_shape), "spacing": list(config.spacing),
           "normalization_schemes": [norm[c.scheme] for c in plan.normalization],
           "use_mask_for_norm": [c.use_nonzero_mask for c in plan.normalization],
           "resampling_fn_data": resampling, "resampling_fn_seg": resampling,
           "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
           "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
           "resampling_fn_probabilities": resampling,
           "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                  "force_separate_z": None},
           "architecture": arch, "batch_dice": config.batch_dice}
    intensity = {}
    for i, c in enumerate(plan.normalization):
        intensity[str(i)] = {"max": 0.0, "mean": c.mean or 0.0, "median": 0.0, "min": 0.0,
                             "percentile_00_5": c.clip_low or 0.0, "percentile_99_5": c.clip_high or 0.0,
                             "std": c.std or 1.0}
    return {"dataset_name": plan.dataset, "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [plan.original_median_spacing[a] for a in plan.transpose_forward],
            "original_median_shape_after_transp": [plan.original_median_shape[a] for a in plan.transpose_forward],
            "image_reader_writer": "SimpleITKIO", "transpose_forward": list(plan.transpose_forward),
            "transpose_backward": list(plan.transpose_backward), "configurations": {"3d_fullres": cfg},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": intensity}


def write_models(work: Path, plan, dataset_json: dict, seed: int = 0) -> None:
    """work/nnunet_model/ (nnU-Net's layout), imported by `autoseg.infer.nnunet_import` into work/imported/."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    from autoseg.common.jsonio import save_record
    from autoseg.common.paths import Paths
    from autoseg.infer.nnunet_import import import_nnunet

    config = plan.configuration("3d_fullres")
    plans = nnunet_plans(plan, config, dataset_json)
    kw = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    torch.manual_seed(seed)
    ref = PlainConvUNet(plan.num_channels, kw["n_stages"], kw["features_per_stage"], nn.Conv3d, kw["kernel_sizes"],
                        kw["strides"], kw["n_conv_per_stage"], plan.num_classes, kw["n_conv_per_stage_decoder"],
                        True, nn.InstanceNorm3d, kw["norm_op_kwargs"], None, None, nn.LeakyReLU,
                        kw["nonlin_kwargs"], deep_supervision=True)
    ref.apply(ref.initialize)
    model_dir = work / "nnunet_model"
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=1), encoding="utf-8")
    (model_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=1), encoding="utf-8")
    torch.save({"network_weights": ref.state_dict(), "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": (0, 1, 2),
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": dataset_json, "device": "cpu"}},
               model_dir / "fold_0" / "checkpoint_final.pth")
    save_record(work / "autoseg_plan.json", plan)
    import_nnunet(Paths.under(work / "imported"), model_dir)  # autoseg predicts with the imported copy


# --------------------------------------------------------------------------- children


def _cpu_s() -> float:
    """User + system seconds of this process and its finished children (nnU-Net's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _usage() -> dict:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_total_s": _cpu_s(), "rss_self_mib": me.ru_maxrss / 1024, "rss_children_mib": kids.ru_maxrss / 1024}


def child_autoseg(work: Path, inp: Path, out: Path, tta: bool, lean: bool, compile_mode: str = "auto",
                  memory_limit: str | None = None) -> dict:
    """autoseg's predictor on the model `import_nnunet` made of nnU-Net's folder (what ``predict -m`` loads).

    ``compile_mode`` ``fp16`` means ``--nnunet-fp16`` (nnU-Net's float16 arithmetic, eager).
    """
    from autoseg.common.jsonio import load_record
    from autoseg.common.paths import Paths
    from autoseg.infer.lean import parse_memory
    from autoseg.infer.predict import PredictOptions, fold_dirs_for, load_model, predict_folder
    from autoseg.planning.plans import Plan

    dataset = load_record(work / "autoseg_plan.json", Plan).dataset
    fp16 = compile_mode == "fp16"
    model = load_model(fold_dirs_for(Paths.under(work / "imported"), dataset, "3d_fullres", [0]), "cpu")
    t0, c0 = time.perf_counter(), _cpu_s()
    options = PredictOptions(tta=tta, lean=lean, compile="off" if fp16 else compile_mode, nnunet_fp16=fp16,
                             memory_limit=parse_memory(memory_limit))
    predict_folder([model], inp, out, force=True, options=options, show_progress=False)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0}


def child_nnunet(work: Path, inp: Path, out: Path, tta: bool) -> dict:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                           perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                           verbose_preprocessing=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(work / "nnunet_model"), (0,), "checkpoint_final.pth")
    t0, c0 = time.perf_counter(), _cpu_s()
    pred.predict_from_files(str(inp), str(out), save_probabilities=False, overwrite=True,
                            num_processes_preprocessing=1, num_processes_segmentation_export=1)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0}


def run_child(side: str, work: Path, inp: Path, out: Path, tta: bool, threads: int, compile_mode: str = "auto",
              memory_limit: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO), "nnUNet_raw": str(work), "nnUNet_preprocessed": str(work),
           "nnUNet_results": str(work)}
    cmd = [sys.executable, __file__, "--child", side, "--work", str(work), "--inp", str(inp), "--out", str(out),
           "--tta", "on" if tta else "off", "--threads", str(threads), "--compile", compile_mode,
           *(["--memory-limit", memory_limit] if memory_limit else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8")
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(a_dir: Path, b_dir: Path, ids: list[str]) -> tuple[float, float]:
    """(mean, min) over cases of the fraction of equal voxels."""
    import numpy as np

    from autoseg.dataset.io import read_image

    fr = [float((read_image(a_dir / f"{c}.nii.gz")[0] == read_image(b_dir / f"{c}.nii.gz")[0]).mean()) for c in ids]
    return float(np.mean(fr)), float(np.min(fr))


# --------------------------------------------------------------------------- setups


def setup_hippocampus(work: Path, cases: int) -> tuple[Path, list[str]]:
    """Raw subset (the first ``cases`` fold-0 validation cases), planned on them; returns (input dir, ids)."""
    from autoseg.common.paths import Paths
    from autoseg.dataset.spec import load_dataset
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.planning.plan import plan_dataset
    from autoseg.splits import make_splits
    from tests.helpers import hippocampus_case_ids, link_hippocampus_subset

    ids = list(make_splits(hippocampus_case_ids()).folds[0].val[:cases])
    paths = Paths.under(work)
    raw = link_hippocampus_subset(paths.raw, ids)
    spec = load_dataset(raw)
    plan = plan_dataset(extract_fingerprint(spec, progress_bar=False))
    write_models(work, plan, json.loads((raw / "dataset.json").read_text(encoding="utf-8")))
    return raw / "imagesTr", ids


def large_case(shape: tuple[int, int, int], seed: int = 0):
    """A CT-like (z, y, x) int16 volume (air, a noisy body, LARGE_CLASSES organ ellipsoids) and its labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    img = np.full(shape, -1000, np.int16)
    body = ((y - shape[1] / 2) / (0.42 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.45 * shape[2])) ** 2 < 1
    img[:, body[0]] = 40
    seg = np.zeros(shape, np.uint8)
    for c in range(1, LARGE_CLASSES + 1):
        cz, cy, cx = rng.uniform(0.2, 0.8, 3) * shape
        rz, ry, rx = rng.uniform(0.05, 0.15, 3) * shape
        inside = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
        seg[inside] = c
        img[inside] = 40 + 20 * c
    img += rng.normal(0, 20, shape).astype(np.int16)
    return img, seg


def setup_large(work: Path, shape: tuple[int, int, int], max_features: int | None = None
                ) -> tuple[Path, list[str], object]:
    """A one-case generated dataset (spacing 0.8 x 0.8 x 1.5 mm), planned (features capped at
    ``max_features`` when given); returns (input dir, ids, plan)."""
    from autoseg.common.paths import Paths
    from autoseg.dataset.io import Geometry, write_image
    from autoseg.dataset.spec import load_dataset
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.planning.plan import plan_dataset

    paths = Paths.under(work)
    raw = paths.raw / "Dataset901_LargeCT"
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    img, seg = large_case(shape)
    geom = Geometry(shape=shape, spacing=(1.5, 0.8, 0.8), origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    write_image(raw / "imagesTr" / "ct_000_0000.nii.gz", img, geom)
    write_image(raw / "labelsTr" / "ct_000.nii.gz", seg, geom)
    meta = {"name": "LargeCT", "channel_names": {"0": "CT"},
            "labels": {"background": 0, **{f"organ{c}": c for c in range(1, LARGE_CLASSES + 1)}},
            "numTraining": 1, "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    plan = plan_dataset(extract_fingerprint(load_dataset(raw), progress_bar=False))
    if max_features:  # memory runs: the accumulators and resampling do not depend on the width
        import dataclasses

        cfg = plan.configuration("3d_fullres")
        cfg = dataclasses.replace(cfg, features_per_stage=tuple(min(f, max_features)
                                                                for f in cfg.features_per_stage))
        plan = dataclasses.replace(plan, configurations={**plan.configurations, "3d_fullres": cfg})
    write_models(work, plan, meta)
    return raw / "imagesTr", ["ct_000"], plan


def estimates(work: Path, inp: Path, plan) -> str:
    """Both predictors' memory for the case in ``inp``: autoseg's lean budget, its whole-volume path's,
    and a lower bound of nnU-Net's (its float16 logit accumulator, before softmax and resampling)."""
    import numpy as np
    import torch

    from autoseg.infer.lean import format_bytes, plan_lean
    from autoseg.infer.predict import LoadedModel, PredictOptions, full_path_bytes, prepare_case
    from autoseg.nets.unet import build_unet

    config = plan.configuration("3d_fullres")
    net = build_unet(config, plan.num_channels, plan.num_classes, deep_supervision=True)
    model = LoadedModel([net], plan, config, (0, 1, 2), torch.device("cpu"))
    case = prepare_case([model], sorted(inp.iterdir()))
    data, props = case.inputs[0]
    lean = plan_lean(model, data.shape, props, None, PredictOptions())
    K, net_vox, orig = plan.num_classes, int(np.prod(data.shape[1:])), int(np.prod(case.geometry.shape))
    nnunet = 2 * K * net_vox  # its float16 logit accumulator alone (predict_sliding_window_return_logits)
    return (f"case {case.geometry.shape} -> network grid {tuple(data.shape[1:])}, {K} classes, patch "
            f"{config.patch_size}\n  autoseg lean (estimate): {lean.describe()}\n"
            f"  autoseg whole-volume path (estimate): {format_bytes(full_path_bytes([model], case))}\n"
            f"  nnU-Net (lower bound: its float16 K x voxels logit accumulator alone): {format_bytes(nnunet)}")


# --------------------------------------------------------------------------- main


def compare(work: Path, inp: Path, ids: list[str], tta: bool, threads: int, compile_modes: tuple[str, ...],
            whole: bool, memory_limit: str | None = None) -> list[str]:
    rows = []
    outs = {}
    sides = [("nnunet", "-"), *(("autoseg", m) for m in compile_modes), *([("autoseg-whole", "off")] if whole else [])]
    for side, mode in sides:
        out = work / f"out_{side}_{mode}_{'tta' if tta else 'notta'}"
        res = run_child(side, work, inp, out, tta, threads, mode, memory_limit if side == "autoseg" else None)
        outs[side] = out
        if "error" in res:
            rows.append(f"| {side} | {mode} | {'on' if tta else 'off'} | failed: {res['error']} | | | | | |")
            continue
        agree = agreement(outs["nnunet"], out, ids) if side != "nnunet" and "nnunet" in outs else (1.0, 1.0)
        rows.append(f"| {side} | {mode} | {'on' if tta else 'off'} | {res['cpu_s'] / len(ids):.2f} | "
                    f"{res['cpu_total_s']:.1f} | "
                    f"{res['wall_s'] / len(ids):.2f} | {res['rss_self_mib']:.0f} | {res['rss_children_mib']:.0f} | "
                    f"{agree[0] * 100:.3f} / {agree[1] * 100:.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=52, help="fold-0 validation cases of Hippocampus")
    ap.add_argument("--tta", choices=("on", "off", "both"), default="both")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each predictor")
    ap.add_argument("--large", action="store_true", help="the generated CT-like case instead of Hippocampus")
    ap.add_argument("--large-shape", type=int, nargs=3, default=(400, 512, 512))
    ap.add_argument("--estimate-only", action="store_true", help="--large: memory estimates, no prediction")
    ap.add_argument("--max-features", type=int, default=None,
                    help="--large: cap the network width (a memory run on a small CPU; say so with the figures)")
    ap.add_argument("--compile", default="off,auto",
                    help="autoseg --compile modes to run, comma-separated (the child takes one); fp16 = --nnunet-fp16")
    ap.add_argument("--memory-limit", default=None, help="autoseg predict --memory-limit (lean path)")
    ap.add_argument("--whole", action="store_true", help="also run autoseg's whole-volume path")
    ap.add_argument("--child", choices=("autoseg", "autoseg-whole", "nnunet"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--inp", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        tta = args.tta == "on"
        res = (child_nnunet(args.work, args.inp, args.out, tta) if args.child == "nnunet"
               else child_autoseg(args.work, args.inp, args.out, tta, lean=args.child == "autoseg",
                                  compile_mode=args.compile, memory_limit=args.memory_limit))
        print(json.dumps({**res, **_usage()}))
        return
    from benchmarks.common import git_commit

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.large:
            inp, ids, plan = setup_large(work, tuple(args.large_shape), args.max_features)
            print(f"features {plan.configuration('3d_fullres').features_per_stage}")
            print(estimates(work, inp, plan))
            if args.estimate_only:
                return
        else:
            inp, ids = setup_hippocampus(work, args.cases)
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {git_commit()}, "
              f"{os.cpu_count()} CPUs, {args.threads} thread(s) per predictor, {len(ids)} case(s), "
              f"load average {os.getloadavg()[0]:.1f}")
        print("| predictor | compile | mirroring | CPU-s/case | CPU-s whole process | wall s/case | peak RSS MiB (process) | "
              "peak RSS MiB (children) | voxels equal to nnU-Net % (mean / min) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for tta in {"on": (True,), "off": (False,), "both": (True, False)}[args.tta]:
            for row in compare(work, inp, ids, tta, args.threads, tuple(args.compile.split(",")), args.whole,
                               args.memory_limit):
                print(row, flush=True)


if __name__ == "__main__":
    main()
