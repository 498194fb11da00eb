"""``autoseg plan``: verify + fingerprint + plans.json, printed as a table with the reasons."""

from __future__ import annotations

import click

from autoseg.cli.app import cli, paths_from
from autoseg.common.errors import AutosegError
from autoseg.planning.plan import CONFIG_NAMES
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.planning.plans import Plan
from autoseg.planning.presets import DEFAULT_PRESET, PRESETS

DEFAULT_GPU_MEMORY_GB = 8.0
"""Budget without a GPU and without --gpu-memory: nnU-Net's 8 GB reference."""


class GreedyMultiOption(click.Option):
    """A ``multiple=True`` option that also takes the values typed after it: ``--configs 2d 3d_fullres``.

    Following words are taken while they look like configuration names (start with 2d/3d), so a
    dataset argument typed after the option is still the argument.
    """

    def add_to_parser(self, parser, ctx):  # type: ignore[no-untyped-def]
        super().add_to_parser(parser, ctx)
        for opt in self.opts:
            entry = getattr(parser, "_long_opt", {}).get(opt) or getattr(parser, "_short_opt", {}).get(opt)
            if entry is None:
                continue
            original = entry.process

            def process(value, state, _original=original):  # type: ignore[no-untyped-def]
                _original(value, state)
                while state.rargs and state.rargs[0].lower().startswith(("2d", "3d")):
                    _original(state.rargs.pop(0), state)

            entry.process = process


def detected_gpu_memory_gb() -> float | None:
    """Total memory of GPU 0 in GB when CUDA is available (the budget of a training that runs there)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.get_device_properties(0).total_memory / 1024 ** 3, 1)


def render_plan(plan: Plan) -> str:
    """One table per configuration: each number with the reason it is what it is."""
    preset = "" if plan.preset == DEFAULT_PRESET else f", preset {plan.preset}"
    lines = [f"Plan of {plan.dataset} for {plan.gpu_memory_gb:g} GB GPU memory{preset}"]
    lines += [f"  {k}: {v}" for k, v in plan.reasons.items()]
    if plan.overrides:
        lines.append(f"  overrides: {' '.join(plan.overrides)}")
    for name, c in plan.configurations.items():
        rows = [("spacing (mm)", " x ".join(f"{s:.4g}" for s in c.spacing), "spacing"),
                ("median shape", " x ".join(map(str, c.median_shape)), "median_shape"),
                ("patch size", " x ".join(map(str, c.patch_size)), "patch_size"),
                ("batch size", str(c.batch_size), "batch_size"),
                ("pools per axis", " x ".join(map(str, c.num_pools_per_axis)), "strides"),
                ("kernels", " ".join("x".join(map(str, k)) for k in c.kernel_sizes), "kernel_sizes"),
                ("features", ",".join(map(str, c.features_per_stage)), "features_per_stage"),
                *([("residual blocks", ",".join(map(str, c.encoder_blocks_per_stage)), "encoder")]
                  if c.encoder_blocks_per_stage else []),
                ("batch dice", str(c.batch_dice), "batch_dice"),
                ("memory estimate", f"{c.estimated_vram_gb:.2f} GB", "estimated_vram_gb")]
        if c.previous_stage is not None:
            rows.append(("previous stage", c.previous_stage, "previous_stage"))
        if c.next_stage is not None:
            rows.append(("next stage", c.next_stage, "next_stage"))
        width = max(len(v) for _, v, _ in rows)
        lines += ["", f"{name}  (data: {c.data_identifier})"]
        lines += [f"  {label:<16}{value:<{width}}  {c.reasons.get(key, '')}" for label, value, key in rows]
    return "\n".join(lines)


@cli.command("plan")
@click.argument("dataset")
@click.option("--gpu-memory", type=float, default=None, metavar="GB",
              help="Memory budget per training (default: this machine's GPU, else 8 GB like nnU-Net).")
@click.option("--configs", cls=GreedyMultiOption, multiple=True, metavar="NAME...",
              help=f"Configurations to plan ({', '.join(CONFIG_NAMES)}; default all that apply). Naming "
                   "3d_lowres or 3d_cascade_fullres plans the cascade even where the rules would not.")
@click.option("--set", "overrides", multiple=True, metavar="CONFIG.KEY=VALUE",
              help="Override a planned number, e.g. 3d_fullres.patch_size=48,64,48 (repeatable).")
@click.option("-j", "--num-workers", type=click.IntRange(min=1), default=1, help="Processes reading cases.")
@click.option("--force", is_flag=True, help="Re-extract the fingerprint and replace a different plans.json.")
@click.option("--from-plans", "from_plans", default=None, metavar="SOURCE",
              help="Copy the configurations (topology, patch, batch, spacing) of SOURCE's plans (a dataset "
                   "or a plans.json), with this dataset's own normalisation: to fine-tune a network "
                   "pretrained on SOURCE (train --pretrained).")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=DEFAULT_PRESET, show_default=True,
              help="Planner preset: resenc-m/l/xl plan nnU-Net's residual-encoder U-Nets for 8/24/40 GB (their "
                   "own budget unless --gpu-memory) into plans_<preset>.json beside plans.json.")
@click.pass_context
def plan_command(ctx: click.Context, dataset: str, gpu_memory: float | None, configs: tuple[str, ...],
                 overrides: tuple[str, ...], num_workers: int, force: bool, from_plans: str | None,
                 preset: str) -> None:
    """Verify DATASET, fingerprint it and write its plans.json (2d, 3d_fullres, 3d_lowres + 3d_cascade_fullres)."""
    names = tuple(n for c in configs for n in c.split(",") if n) or None
    if from_plans is not None and (gpu_memory is not None or names or preset != DEFAULT_PRESET):
        raise AutosegError("--gpu-memory, --configs and --preset do not apply with --from-plans: the source "
                           "plans' configurations are taken whole", where="--from-plans")
    if gpu_memory is not None or preset != DEFAULT_PRESET:  # a preset plans for its own memory target
        budget = gpu_memory
    else:
        budget = detected_gpu_memory_gb() or DEFAULT_GPU_MEMORY_GB
    request = PlanRequest(gpu_memory_gb=budget, configs=names, overrides=tuple(overrides),
                          num_workers=num_workers, force=force, from_plans=from_plans, preset=preset)
    outcome = plan_and_save(paths_from(ctx), dataset, request)
    click.echo(render_plan(outcome.plan))
    state = "written" if outcome.written else "unchanged (identical plan already there)"
    click.echo(f"\n{outcome.plans_file}: {state}")
