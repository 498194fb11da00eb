"""Plain-text tables for the terminal (no rich/tabulate dependency): status, plans, sweep results.

`render_table` aligns columns, right-aligns numbers, and can clip long cells so a table fits a
terminal; the scheduler's live view and ``autoseg status`` use it, other reports may too.
"""

from __future__ import annotations

from collections.abc import Sequence

from autoseg.schedule.status import JobStatus

ELLIPSIS = "…"


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%s"))
        return True
    except ValueError:
        return False


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], max_width: dict[int, int] | None = None,
                 sep: str = "  ") -> str:
    """Rows under a header and a rule; ``None`` shows as '-', numbers right-aligned, cells clipped per column."""
    max_width = max_width or {}
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, header has {len(headers)}")
        for i, width in max_width.items():
            if len(row[i]) > width:
                row[i] = ELLIPSIS + row[i][-(width - 1):]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_is_number(r[i]) or r[i] == "-" for r in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return sep.join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(list(headers)), sep.join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def format_duration(seconds: float | None) -> str | None:
    """``3725`` -> ``1h02m``; ``95`` -> ``1m35s``; None stays None."""
    if seconds is None:
        return None
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


STATUS_HEADERS = ("job", "state", "GPU", "CPUs", "workers", "try", "epoch", "ETA", "pseudo-Dice", "val Dice", "elapsed", "log")


def status_rows(statuses: Sequence[JobStatus]) -> list[list[object]]:
    """The cells of ``autoseg status`` (and the live view of ``train-all``)."""
    rows: list[list[object]] = []
    for s in statuses:
        p = s.progress
        epoch = f"{p.epochs_done}/{p.epochs_total or '?'}" if p else None
        eta = None
        if p and s.state.value == "running":  # after the last epoch comes the final validation
            done = p.epochs_total is not None and p.epochs_done >= p.epochs_total
            if done and p.validation_dice is None:  # "val 3/52 4m": the final validation's own ETA
                cases = f"val {p.validation_cases[0]}/{p.validation_cases[1]}" if p.validation_cases else None
                eta = " ".join(x for x in (cases or "validating", format_duration(p.eta_s)) if x)
            else:
                eta = format_duration(p.eta_s)
        dice = f"{p.last_pseudo_dice:.4f}" if p and p.last_pseudo_dice is not None else None
        val = f"{p.validation_dice:.4f}" if p and p.validation_dice is not None else None
        rows.append([s.job_id, s.state.value, s.gpu, s.cpus, s.workers, s.attempt or None, epoch, eta, dice, val,
                     format_duration(s.elapsed_s), s.log_path])
    return rows


def _state_counts(statuses: Sequence[JobStatus]) -> str:
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state.value] = counts.get(s.state.value, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def render_status(statuses: Sequence[JobStatus], log_width: int = 60, hidden: Sequence[JobStatus] = (),
                  show_runs: bool = False) -> str:
    """The ``autoseg status`` table, a one-line count per state under it, then why each failed job failed.

    ``hidden``: the jobs of earlier runs left out (counted in one last line that says how to see
    them); ``show_runs``: a first column with each job's run, jobs grouped by run (``--all``).
    """
    if not statuses:
        return "no jobs recorded under this results root"
    headers, cells, log_col = STATUS_HEADERS, status_rows(statuses), len(STATUS_HEADERS) - 1
    if show_runs:
        runs = [s.run_id for s in statuses]
        order = sorted(range(len(cells)), key=lambda i: runs[i] or 0)  # stable: store order within a run
        headers, cells, log_col = ("run", *headers), [[runs[i], *cells[i]] for i in order], log_col + 1
    table = render_table(headers, cells, max_width={log_col: log_width})
    reasons = [f"{s.job_id} failed: {s.message}" for s in statuses if s.state.value == "failed" and s.message]
    lines = [table, _state_counts(statuses), *reasons]
    if hidden:
        lines.append(f"{len(hidden)} job(s) of earlier runs not shown ({_state_counts(hidden)}): "
                     "`autoseg status --all` lists every run")
    return "\n".join(lines)
