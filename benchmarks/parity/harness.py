"""Side-by-side harness: autoseg and nnU-Net 2.8.1 on the same data, split, batch and budget.

Run through ``benchmarks/parity/run.sh`` (which makes the nnU-Net venv). For every
configuration x iteration budget x seed it trains fold ``--fold`` with both frameworks
(nnU-Net through ``nnUNetTrainer_Budget``, its default trainer with the budget set), lets each
predict the fold's validation cases its own way (sliding window, mirroring), scores both
folders with one evaluator (``autoseg evaluate`` against the raw labels) and writes:

- ``WORK/parity/<config>_<iters>_s<seed>_<framework>.json``: one run's figures (kept: a rerun
  of the harness skips runs already measured, so a long grid can be resumed);
- a table and a learning-curve plot into ``benchmarks/RESULTS.md`` / ``benchmarks/parity_<dataset>.png``.

CPU seconds per iteration are the training phase's process CPU time (all threads) divided by
the iterations, both frameworks with augmentation in the training process (0 workers), so the
figure counts the same work; seconds per iteration are wall time of the same phase.
Peak memory is the maximum resident set of the whole training command (GNU time).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

DATASETS = {  # --dataset name -> (MSD folder under ../shared/datasets, task id, dataset name)
    "hippocampus": ("msd_hippocampus", 4, "Dataset004_Hippocampus"),
}
TRAINER = "nnUNetTrainer_Budget"
BEGIN, END = "<!-- parity-harness:{name}:begin -->", "<!-- parity-harness:{name}:end -->"


def sh(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` with its output into ``log``; fail with the log's tail."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"parity harness: command failed (exit {rc}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")


class Work:
    """The harness's folders: autoseg roots, nnU-Net roots, logs and per-run figures."""

    def __init__(self, root: Path, dataset: str) -> None:
        self.root = root
        self.msd, self.task_id, self.name = DATASETS[dataset]
        self.raw, self.pre, self.res = root / "raw", root / "pre", root / "res"
        self.nn_raw, self.nn_pre, self.nn_res = root / "nn_raw", root / "nn_pre", root / "nn_res"
        self.runs = root / "parity"
        self.logs = root / "logs"
        for d in (self.runs, self.logs, self.nn_raw, self.nn_pre, self.nn_res):
            d.mkdir(parents=True, exist_ok=True)

    def roots(self) -> list[str]:
        return ["--raw", str(self.raw), "--preprocessed", str(self.pre), "--results", str(self.res)]

    def nn_env(self, results: Path | None = None) -> dict[str, str]:
        return {"nnUNet_raw": str(self.nn_raw), "nnUNet_preprocessed": str(self.nn_pre),
                "nnUNet_results": str(results or self.nn_res), "nnUNet_n_proc_DA": "0"}


def prepare(w: Work, source: Path, configs: list[str], nn_bin: Path) -> None:
    """Convert once (nnU-Net's raw is a link to autoseg's conversion), plan and preprocess with both,
    and give nnU-Net autoseg's split as its ``splits_final.json`` (the same cases in every fold)."""
    log = w.logs / "prepare.log"
    raw_ds = w.raw / w.name
    if not (raw_ds / "dataset.json").is_file():
        sh(["autoseg", *w.roots(), "convert-msd", str(source), "--id", str(w.task_id)], log)
    if not (w.pre / w.name / "plans.json").is_file():
        sh(["autoseg", *w.roots(), "plan", str(w.task_id), "-j", "2"], log)
    missing = [c for c in configs if not (w.pre / w.name / c).is_dir()]
    if missing:
        sh(["autoseg", *w.roots(), "preprocess", str(w.task_id), "--configs", *missing, "-j", "2"], log)
    link = w.nn_raw / w.name
    if not link.exists():
        link.symlink_to(raw_ds.resolve())
    nn_missing = [c for c in configs if not (w.nn_pre / w.name / f"nnUNetPlans_{c}").is_dir()]
    if nn_missing:
        sh([str(nn_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(w.task_id), "-c", *nn_missing,
            "-np", *["2"] * len(nn_missing)], log, w.nn_env())
    splits = json.loads((w.pre / w.name / "splits.json").read_text())["folds"]
    (w.nn_pre / w.name / "splits_final.json").write_text(
        json.dumps([{"train": f["train"], "val": f["val"]} for f in splits], indent=1))


def _peak_kib(time_file: Path) -> int:
    return int(time_file.read_text().split()[-1])


def run_autoseg(w: Work, config: str, iters: int, seed: int, a: argparse.Namespace) -> dict:
    variant = f"parity_{iters}"
    fold_dir = w.res / w.name / config / variant / f"seed_{seed}" / f"fold_{a.fold}"
    log, tf = w.logs / f"autoseg_{config}_{iters}_s{seed}.log", w.logs / f"autoseg_{config}_{iters}_s{seed}.time"
    cmd = ["/usr/bin/time", "-o", str(tf), "-f", "%M", "autoseg", *w.roots(), "train", str(w.task_id), config,
           str(a.fold), "--device", "cpu", "--quiet", "--force", "--variant", variant, "--seed", str(seed),
           "--num-workers", "0", "--set", f"batch_size={a.batch_size}", "--set", f"epochs={iters // a.iterations_per_epoch}",
           "--set", f"iterations_per_epoch={a.iterations_per_epoch}", "--set", f"val_iterations={a.val_iterations}"]
    sh(cmd, log)
    hist = [json.loads(line) for line in (fold_dir / "training_log.jsonl").read_text().splitlines() if line.strip()]
    return {"pred_dir": str(fold_dir / "validation"), "peak_mib": _peak_kib(tf) / 1024,
            "train_loss": [h["train_loss"] for h in hist], "pseudo_dice": [h["pseudo_dice"] for h in hist],
            "train_wall_s": sum(h["iterations_per_s"] ** -1 * a.iterations_per_epoch for h in hist),
            "train_cpu_s": sum(h["train_cpu_s"] for h in hist)}


def run_nnunet(w: Work, config: str, iters: int, seed: int, a: argparse.Namespace, nn_bin: Path) -> dict:
    results = w.nn_res / f"{config}_{iters}_s{seed}"
    fold_dir = results / w.name / f"{TRAINER}__nnUNetPlans__{config}" / f"fold_{a.fold}"
    shutil.rmtree(fold_dir, ignore_errors=True)
    log, tf = w.logs / f"nnunet_{config}_{iters}_s{seed}.log", w.logs / f"nnunet_{config}_{iters}_s{seed}.time"
    env = {**w.nn_env(results), "PARITY_EPOCHS": str(iters // a.iterations_per_epoch),
           "PARITY_ITERATIONS": str(a.iterations_per_epoch), "PARITY_VAL_ITERATIONS": str(a.val_iterations),
           "PARITY_BATCH_SIZE": str(a.batch_size), "PARITY_SEED": str(seed)}
    sh(["/usr/bin/time", "-o", str(tf), "-f", "%M", str(nn_bin / "nnUNetv2_train"), str(w.task_id), config,
        str(a.fold), "-tr", TRAINER, "-device", "cpu"], log, env)
    text = "\n".join(p.read_text() for p in sorted(fold_dir.glob("training_log_*.txt")))
    losses = [float(x) for x in re.findall(r"train_loss (-?[\d.]+)", text)]
    dice = [[float(v) for v in re.findall(r"np\.float32\((-?[\d.naN]+)\)", m)] or ast.literal_eval(m)
            for m in re.findall(r"Pseudo dice (\[.*\])", text)]
    rows = [line.split("\t") for line in (fold_dir / "epoch_times.tsv").read_text().splitlines()[1:]]
    return {"pred_dir": str(fold_dir / "validation"), "peak_mib": _peak_kib(tf) / 1024, "train_loss": losses,
            "pseudo_dice": dice, "train_wall_s": sum(float(r[1]) for r in rows),
            "train_cpu_s": sum(float(r[2]) for r in rows)}


def score(w: Work, pred_dir: str, out: Path) -> dict:
    """Mean Dice per foreground class and their mean, by autoseg's evaluator against the raw labels."""
    sh(["autoseg", *w.roots(), "evaluate", "--pred", pred_dir, "--ref", str(w.raw / w.name / "labelsTr"),
        "-d", str(w.task_id), "-o", str(out), "--allow-missing", "--force", "-j", "2"], w.logs / "evaluate.log")
    s = json.loads(out.read_text())
    names = {str(v): k for k, v in s["labels"].items()}
    return {"dice": {names[str(k)]: m["dice"] for k, m in s["mean"].items()}, "mean_dice": s["foreground_mean"]["dice"]}


def measure(w: Work, framework: str, config: str, iters: int, seed: int, a: argparse.Namespace,
            nn_bin: Path) -> dict:
    out = w.runs / f"{config}_{iters}_s{seed}_{framework}.json"
    if out.is_file() and not a.force:
        return json.loads(out.read_text())
    print(f"[parity] {framework} {config} {iters} iterations seed {seed}", flush=True)
    r = run_autoseg(w, config, iters, seed, a) if framework == "autoseg" else run_nnunet(w, config, iters, seed, a, nn_bin)
    r.update(score(w, r["pred_dir"], w.runs / f"{config}_{iters}_s{seed}_{framework}.summary.json"))
    r.update(framework=framework, config=config, iterations=iters, seed=seed,
             s_per_it=r["train_wall_s"] / iters, cpu_s_per_it=r["train_cpu_s"] / iters)
    out.write_text(json.dumps(r, indent=1))
    return r


def table(results: list[dict], a: argparse.Namespace, command: str) -> str:
    classes = list(results[0]["dice"])
    head = ["config", "iterations", "seed", "framework", *classes, "mean Dice", "s/it", "CPU-s/it", "peak MiB"]
    lines = [f"Measured {datetime.date.today()} on {platform.node() or 'this machine'} "
             f"({os.cpu_count()} CPUs, no GPU), fold {a.fold}, batch {a.batch_size}, "
             f"{a.iterations_per_epoch} iterations per epoch, {a.val_iterations} validation batches per epoch.",
             f"Command: `{command}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([r["config"], str(r["iterations"]), str(r["seed"]), r["framework"],
                                        *(f"{r['dice'][c]:.3f}" for c in classes), f"**{r['mean_dice']:.3f}**",
                                        f"{r['s_per_it']:.2f}", f"{r['cpu_s_per_it']:.2f}",
                                        f"{r['peak_mib']:.0f}"]) + " |")
    lines += ["", "Mean over seeds (autoseg − nnU-Net):", "",
              "| config | iterations | autoseg mean Dice | nnU-Net mean Dice | Δ Dice | autoseg CPU-s/it | nnU-Net CPU-s/it |",
              "|---|---|---|---|---|---|---|"]
    groups = sorted({(r["config"], r["iterations"]) for r in results})
    for cfg, it in groups:
        def mean(fw: str, key: str) -> float:
            vals = [r[key] for r in results if (r["config"], r["iterations"], r["framework"]) == (cfg, it, fw)]
            return sum(vals) / len(vals) if vals else float("nan")
        da, dn = mean("autoseg", "mean_dice"), mean("nnunet", "mean_dice")
        lines.append(f"| {cfg} | {it} | {da:.3f} | {dn:.3f} | {da - dn:+.3f} | {mean('autoseg', 'cpu_s_per_it'):.2f} "
                     f"| {mean('nnunet', 'cpu_s_per_it'):.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({r["config"] for r in results})
    fig, axes = plt.subplots(len(configs), 2, figsize=(11, 3.6 * len(configs)), squeeze=False)
    colors = {"autoseg": "tab:blue", "nnunet": "tab:orange"}
    for row, cfg in zip(axes, configs):
        for r in (r for r in results if r["config"] == cfg):
            style = dict(color=colors[r["framework"]], alpha=0.85,
                         linestyle="-" if r["iterations"] == max(x["iterations"] for x in results) else "--")
            label = f"{r['framework']} {r['iterations']} it s{r['seed']}"
            n = len(r["pseudo_dice"])
            x = [(e + 1) * r["iterations"] / n for e in range(n)]
            row[0].plot(x, [sum(d) / len(d) for d in r["pseudo_dice"]], label=label, **style)
            row[1].plot(x[:len(r["train_loss"])], r["train_loss"], label=label, **style)
        row[0].set(title=f"{cfg}: mean pseudo-Dice per epoch", xlabel="iteration", ylabel="pseudo-Dice")
        row[1].set(title=f"{cfg}: training loss per epoch", xlabel="iteration", ylabel="loss")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_results(md: Path, name: str, body: str) -> None:
    """Replace this dataset's harness section of RESULTS.md (or append it)."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    text = md.read_text() if md.is_file() else "# Benchmarks\n"
    section = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## Side by side with nnU-Net 2.8.1: {name}\n\n{section}\n"
    md.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="hippocampus")
    ap.add_argument("--config", nargs="+", default=["3d_fullres"])
    ap.add_argument("--iterations", nargs="+", type=int, default=[180])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--iterations-per-epoch", type=int, default=20)
    ap.add_argument("--val-iterations", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/autoseg_parity"))
    ap.add_argument("--nnunet-bin", type=Path, required=True, help="bin/ of the venv holding nnunetv2")
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[3] / "shared")
    ap.add_argument("--results-md", type=Path, default=Path(__file__).resolve().parents[1] / "RESULTS.md")
    ap.add_argument("--force", action="store_true", help="re-measure runs already measured")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: tabulate the runs of this grid already measured in WORKDIR")
    ap.add_argument("--command", default=" ".join(sys.argv), help=argparse.SUPPRESS)
    a = ap.parse_args()
    bad = [i for i in a.iterations if i % a.iterations_per_epoch]
    if bad:
        sys.exit(f"parity harness: --iterations {bad} not a multiple of --iterations-per-epoch {a.iterations_per_epoch}")
    source = a.shared / "datasets" / DATASETS[a.dataset][0]
    if not source.is_dir():
        sys.exit(f"parity harness: {source}: dataset folder not found")
    w = Work(a.workdir, a.dataset)
    if a.report_only:  # e.g. one table for grids measured by separate (possibly concurrent) invocations
        done = [w.runs / f"{c}_{i}_s{sd}_{fw}.json" for c in a.config for i in a.iterations for sd in a.seeds
                for fw in ("nnunet", "autoseg")]
        results = [json.loads(f.read_text()) for f in done if f.is_file()]
        if not results:
            sys.exit(f"parity harness: no measured runs of this grid in {w.runs}")
        png = a.results_md.parent / f"parity_{a.dataset}.png"
        plot(results, png)
        write_results(a.results_md, a.dataset, table(results, a, a.command) + f"\n\n![learning curves]({png.name})")
        print(table(results, a, a.command))
        return
    prepare(w, source, a.config, a.nnunet_bin)
    results = []
    for config in a.config:
        for iters in a.iterations:
            for seed in a.seeds:
                for fw in ("nnunet", "autoseg"):
                    results.append(measure(w, fw, config, iters, seed, a, a.nnunet_bin))
                    body = table(results, a, a.command)
                    png = a.results_md.parent / f"parity_{a.dataset}.png"
                    plot(results, png)
                    write_results(a.results_md, a.dataset, body + f"\n\n![learning curves]({png.name})")
    print(table(results, a, a.command))


if __name__ == "__main__":
    main()
