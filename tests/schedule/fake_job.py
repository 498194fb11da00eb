"""A stand-in for `autoseg train` in scheduler tests: records what it saw, "trains" in steps, checkpoints.

Usage: python fake_job.py OUT_DIR STEPS STEP_SECONDS [fail] [stop=SECONDS]

Writes only under OUT_DIR (its training dir) and $TMPDIR. Prints "resumed from step K" when a
checkpoint exists (like ``--continue``), saves a checkpoint after every step and on SIGINT /
SIGTERM (then exits 130, like the trainer), exits 1 at once with "fail". With "stop=S" a stop
takes S seconds ("stopping at step K", then the save), like a trainer finishing a long iteration.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    out, steps, step_s = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    fail = "fail" in sys.argv[4:]
    stop_s = next((float(a.partition("=")[2]) for a in sys.argv[4:] if a.startswith("stop=")), 0.0)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "ckpt.json"
    step = json.loads(ckpt.read_text(encoding="utf-8"))["step"] if ckpt.exists() else 0
    if step:
        print(f"resumed from step {step}", flush=True)
    seen = {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "omp": os.environ.get("OMP_NUM_THREADS"),
            "workers": os.environ.get("AUTOSEG_NUM_WORKERS"), "tmpdir": os.environ.get("TMPDIR"),
            "affinity": sorted(os.sched_getaffinity(0)), "pid": os.getpid(), "start": time.time()}
    (Path(os.environ["TMPDIR"]) / "scratch.txt").write_text("temp file\n")

    def stop(signum, frame):
        if stop_s:
            print(f"stopping at step {step}", flush=True)
            time.sleep(stop_s)
        ckpt.write_text(json.dumps({"step": step}))
        print(f"interrupted at step {step}", flush=True)
        sys.exit(130)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if fail:
        print("deliberate failure", flush=True)
        return 1
    while step < steps:
        time.sleep(step_s)
        step += 1
        ckpt.write_text(json.dumps({"step": step}))
    seen["end"] = time.time()
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps(seen) + "\n")
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
