"""Collect benchmarks/gpu_check.sh's run files into one JSON and a RESULTS.md section.

    python benchmarks/gpu_check_report.py OUT_DIR     # writes OUT_DIR/gpu_check.json and gpu_check.md
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def main(out: Path) -> None:
    runs = out / "runs"
    train = {p.stem: _load(p) for p in sorted(runs.glob("*.json")) if p.stem != "augment"}
    augment = _load(runs / "augment.json")
    predict_log = (out / "logs" / "predict.log")
    predict = re.findall(r"TTA (on |off): ([\d.]+) cases/s", predict_log.read_text()) if predict_log.is_file() else []
    rc_file = runs / "pytest_gpu.rc"
    pytest_tail = (out / "logs" / "pytest_gpu.log").read_text().strip().splitlines()[-1:] \
        if (out / "logs" / "pytest_gpu.log").is_file() else ["(not run)"]
    summary = {"augment": augment, "train": train, "predict_cases_per_s": {k.strip(): float(v) for k, v in predict},
               "pytest_gpu": {"rc": rc_file.read_text().strip() if rc_file.is_file() else None,
                              "last_line": pytest_tail[0]}}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")

    any_run = next((r for r in train.values() if r), None)
    lines = [f"## gpu_check — {any_run['date'] if any_run else '?'} — {any_run['device'] if any_run else '?'}", "",
             f"`OUT=... bash benchmarks/gpu_check.sh` at commit {any_run['commit'] if any_run else '?'}.", "",
             f"gpu-marked tests: {summary['pytest_gpu']['last_line']} (rc {summary['pytest_gpu']['rc']})", ""]
    if augment:
        lines += ["| config | batch | augmentation | on | samples/s | samples per CPU-s | x nnU-Net per core |",
                  "|---|---|---|---|---|---|---|"]
        for r in augment["rows"]:
            lines.append(f"| {r['config']} | {r['batch']} | {r['path']} | {r['device']} | {r['samples_per_s']:.0f} | "
                         f"{r['samples_per_cpu_s']:.0f} | {r['vs_nnunet_per_core']:.2f} |")
        lines.append("")
    lines += ["Hippocampus 3d_fullres training (real data, planned patch and batch):", "",
              "| run | augmentation | workers | amp | compile | iterations/s | data wait |", "|---|---|---|---|---|---|---|"]
    for name, r in train.items():
        if r:
            lines.append(f"| {name} | {r['augment_device']} | {r['workers']} | {r['amp']} | {r['compile']} | "
                         f"{r['iterations_per_s']:.2f} | {100 * r['data_wait_fraction']:.0f} % |")
        else:
            lines.append(f"| {name} | (failed or timed out: see logs/{name}.log) | | | | | |")
    for n in (2, 4):
        jobs = [r for k, r in train.items() if k.startswith(f"packed{n}_") and r]
        if jobs:
            total = sum(r["iterations_per_s"] for r in jobs)
            per_job = ", ".join(f"{r['iterations_per_s']:.2f}" for r in jobs)
            lines.append(f"\n{n} jobs packed on one GPU: per job {per_job} it/s, total {total:.2f} it/s")
    if predict:
        lines.append("\npredict (bench_predict, 3d_fullres, 10 cases): "
                     + ", ".join(f"TTA {k.strip()} {float(v):.2f} cases/s" for k, v in predict))
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
