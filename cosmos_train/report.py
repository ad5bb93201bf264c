"""`cosmos-train report RUN_DIR`: PNG plots and a short Markdown summary of a run, from what it wrote.

Reads RUN_DIR/metrics.jsonl (training rows carry `loss`; validation rows carry `val_*` keys and no `loss`),
run_summary.json, data_info.json, recipe.yaml and samples/step-N/ (validation samples), and writes RUN_DIR/report/:
`report.md` and one PNG per plot that has data (a reasoner run has no sigma bins, a run without validation no
validation curves). Works on a run still training (it reads what is there).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cosmos_train.errors import UserError

REPORT_DIR = "report"


# ---------------------------------------------------------------------------------------------------------------
# reading the run
# ---------------------------------------------------------------------------------------------------------------


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        v = _number(row.get(key))
        if v is not None and _number(row.get("step")) is not None:
            steps.append(int(row["step"]))
            values.append(v)
    return steps, values


def _keys(rows: list[dict], prefix: str, exclude: tuple = ()) -> list[str]:
    found: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if k.startswith(prefix) and not k.startswith(exclude) and _number(v) is not None:
                found.setdefault(k, None)
    return sorted(found, key=_sort_key)


def _sort_key(key: str):
    """Keys ending in a number (or a range) sort by it: loss_sigma_0.2-0.4 before loss_sigma_0.4-0.6."""
    tail = key.rsplit("_", 1)[-1].split("-")[0]
    try:
        return (0, float(tail), key)
    except ValueError:
        return (1, 0.0, key)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"report: {run_dir} has no metrics.jsonl (not a cosmos_train run directory, or the run has not "
                        "finished a step yet)")
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line of a run that was stopped mid-write
        if isinstance(row, dict) and _number(row.get("step")) is not None:
            rows.append(row)
    if not rows:
        raise UserError(f"report: {path} holds no metrics rows yet")
    # a resumed run may have logged some steps twice: keep the last row of each (step, kind)
    last: dict = {}
    for i, row in enumerate(rows):
        last[(int(row["step"]), "loss" in row, tuple(sorted(k for k in row if k.startswith("val_"))))] = i
    return [rows[i] for i in sorted(last.values())]


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("report: matplotlib is not installed: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


class _Plots:
    def __init__(self, out_dir: Path):
        self.plt = _pyplot()
        self.out_dir = out_dir
        self.written: list[tuple[str, str]] = []  # (file name, title)

    def lines(self, name: str, title: str, series: list[tuple[str, list, list, dict]], ylabel: str = "",
              logy: bool = False) -> None:
        series = [s for s in series if s[1] and s[2]]
        if not series:
            return
        plt = self.plt
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        for label, xs, ys, style in series:
            if len(xs) < 30 and "marker" not in style:  # sparse series (few steps, or a rare sigma bin): show points
                style = {**style, "marker": ".", "markersize": 6}
            ax.plot(xs, ys, label=label, **style)
        values = [v for _, _, ys, _ in series for v in ys]
        if logy and values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:  # beside the axes, never over a data point
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
            fig.tight_layout()
        self._save(fig, name, title)

    def panels(self, name: str, title: str, panels: list[tuple[str, list, list]]) -> None:
        panels = [p for p in panels if p[1] and p[2]]
        if not panels:
            return
        plt = self.plt
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), dpi=100, sharex=True, squeeze=False)
        for ax, (label, xs, ys) in zip(axes[:, 0], panels):
            ax.plot(xs, ys, lw=1.2)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(title)
        self._save(fig, name, title)

    def _save(self, fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(self.out_dir / name)
        self.plt.close(fig)
        self.written.append((name, title))


def _window(n: int) -> int:
    return max(1, n // 50)


def _plot_all(plots: _Plots, train: list[dict], val: list[dict]) -> None:
    steps, loss = _series(train, "loss")
    w = _window(len(loss))
    val_steps, val_loss = _series(val, "val_loss")
    plots.lines("loss.png", "loss", [
        ("train loss", steps, loss, {"lw": 0.6, "alpha": 0.35 if w > 1 else 1.0, "color": "tab:blue"}),
        (f"train loss (mean of {w})", steps, _smooth(loss, w) if w > 1 else [], {"lw": 1.6, "color": "tab:blue"}),
        ("validation loss", val_steps, val_loss, {"marker": "o", "lw": 1.6, "color": "tab:orange"}),
    ], ylabel="loss", logy=True)

    modality = _keys(train, "loss_", exclude=("loss_sigma_",))
    plots.lines("loss_by_modality.png", "training loss by modality",
                [(k[len("loss_"):], *_smoothed(train, k), {"lw": 1.2}) for k in modality], ylabel="loss", logy=True)
    plots.lines("loss_by_sigma.png", "training loss by sigma bin" + (f" (mean of {w} steps)" if w > 1 else ""),
                [(k[len("loss_sigma_"):], *_smoothed(train, k), {"lw": 1.2}) for k in _keys(train, "loss_sigma_")],
                ylabel="loss", logy=True)
    plots.lines("val_loss_by_sigma.png", "validation loss at fixed sigmas (quantile of the sigma density)",
                [(f"q {k[len('val_loss_sigma_'):]}", *_series(val, k), {"marker": "o", "lw": 1.2})
                 for k in _keys(val, "val_loss_sigma_")], ylabel="loss", logy=True)
    plots.lines("val_action.png", "held-out action error (de-normalized MAE)",
                [(k[len("val_action_mae_"):], *_series(val, k), {"marker": "o", "lw": 1.2})
                 for k in _keys(val, "val_action_mae_")], ylabel="MAE")
    plots.panels("throughput.png", "throughput", [
        ("samples/s", *_series(train, "samples_per_s")), ("tokens/s", *_series(train, "tokens_per_s"))])
    plots.lines("lr.png", "learning rate", [("lr", *_series(train, "lr"), {"lw": 1.4})], ylabel="lr")
    plots.lines("grad_norm.png", "gradient norm (before clipping)",
                [("grad norm", *_series(train, "grad_norm"), {"lw": 0.8})], ylabel="norm", logy=True)
    plots.panels("system.png", "utilization", [
        ("MFU", *_series(train, "mfu")), ("peak memory (GiB)", *_series(train, "peak_memory_gb")),
        ("data wait (share of step time)", *_data_wait(train))])


def _smoothed(rows: list[dict], key: str) -> tuple[list, list]:
    xs, ys = _series(rows, key)
    return xs, _smooth(ys, _window(len(ys)))


def _data_wait(rows: list[dict]) -> tuple[list, list]:
    xs, ys = _series(rows, "data_wait")
    if xs:
        return xs, ys
    for row in rows:
        d, t = _number(row.get("data_time_s")), _number(row.get("step_time_s"))
        if d is not None and t:
            xs.append(int(row["step"]))
            ys.append(min(1.0, d / t))
    return xs, ys


# ---------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _recipe_line(run_dir: Path) -> str | None:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        recipe = yaml.safe_load(path.read_text()) or {}
    except Exception:
        return None
    train = recipe.get("train") or {}
    parts = [f"objective {recipe.get('objective', '?')}", f"method {train.get('method', '?')}",
             f"model {(recipe.get('model') or {}).get('pretrained', '?')}"]
    if recipe.get("action"):
        parts.append("action run")
    if recipe.get("description"):
        parts.append(f"\"{recipe['description']}\"")
    return ", ".join(parts)


def _skips(run_dir: Path, summary: dict | None, rows: list[dict]) -> tuple[dict, int | None]:
    by_reason: dict = {}
    for source in ((summary or {}).get("skipped"), (_read_json(run_dir / "data_info.json") or {}).get("skipped")):
        if isinstance(source, dict):
            for reason, n in source.items():
                if _number(n) is not None:
                    by_reason[reason] = max(by_reason.get(reason, 0), int(n))
    steps = [int(v) for v in (_number(r.get("skipped_steps")) for r in rows) if v is not None]
    skipped_steps = _number((summary or {}).get("skipped_steps"))
    if steps or skipped_steps is not None:
        return by_reason, int(max(steps + ([skipped_steps] if skipped_steps is not None else [])))
    return by_reason, None


def _latest_samples(run_dir: Path) -> tuple[int, Path, list[dict]] | None:
    root = run_dir / "samples"
    if not root.is_dir():
        return None
    steps = []
    for d in root.iterdir():
        try:
            if d.is_dir() and d.name.startswith("step-"):
                steps.append((int(d.name.split("-", 1)[1]), d))
        except ValueError:
            continue
    for step, d in sorted(steps, reverse=True):
        info = _read_json(d / "samples.json") or {}
        records = info.get("samples") if isinstance(info, dict) else None
        if not isinstance(records, list):
            records = [{"file": p.name} for p in sorted(d.iterdir()) if p.suffix.lower() in (".mp4", ".png")]
        records = [r for r in records if isinstance(r, dict) and (d / str(r.get("file", ""))).is_file()]
        if records:
            return step, d, records
    return None


def make_report(run_dir, out_dir=None) -> Path:
    """Write the report of `run_dir` (default RUN_DIR/report/); returns report.md."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"report: run directory not found: {run_dir}")
    rows = _read_rows(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"report: cannot write {out_dir} ({err})") from None
    train = [r for r in rows if _number(r.get("loss")) is not None]
    val = [r for r in rows if any(k.startswith("val_") for k in r)]
    plots = _Plots(out_dir)
    _plot_all(plots, train, val)

    summary = _read_json(run_dir / "run_summary.json")
    summary = summary if isinstance(summary, dict) else None
    lines = [f"# Run report: {run_dir.name}", "", f"Run directory: `{run_dir.resolve()}`"]
    recipe = _recipe_line(run_dir)
    if recipe:
        lines.append(f"Recipe: {recipe}")
    lines += ["", "## Summary", ""]
    last_step = max(int(r["step"]) for r in rows)
    stopped = (summary or {}).get("stopped") or (summary or {}).get("interrupted")
    status = (f"stopped by {stopped}" if stopped else "finished") if summary else \
        "no run_summary.json yet (still training, or killed)"
    lines.append(f"- steps: {summary.get('steps', last_step) if summary else last_step} ({status})")
    _, loss = _series(train, "loss")
    if loss:
        tail = loss[-max(1, min(10, len(loss) // 10 or 1)):]
        mean = f" (mean of the last {len(tail)}: {_fmt(sum(tail) / len(tail))})" if len(tail) > 1 else ""
        lines.append(f"- training loss: first {_fmt(loss[0])}, last {_fmt(loss[-1])}{mean}, lowest {_fmt(min(loss))}")
    val_steps, val_loss = _series(val, "val_loss")
    if val_loss:
        best = min(range(len(val_loss)), key=lambda i: val_loss[i])
        lines.append(f"- validation loss: best {_fmt(val_loss[best])} at step {val_steps[best]}, last "
                     f"{_fmt(val_loss[-1])} at step {val_steps[-1]} ({len(val_loss)} validations)")
    for key in _keys(val, "val_action_mae_"):
        xs, ys = _series(val, key)
        lines.append(f"- held-out action error ({key[len('val_action_mae_'):]}): last {_fmt(ys[-1])} at step "
                     f"{xs[-1]}, best {_fmt(min(ys))}")
    by_reason, skipped_steps = _skips(run_dir, summary, rows)
    total = sum(by_reason.values())
    lines.append(f"- skipped samples: {total}" + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items()))
                                                  + ")" if by_reason else ""))
    if skipped_steps is not None:
        lines.append(f"- skipped steps (non-finite loss or gradients): {skipped_steps}")
    sps, tps = _series(train, "samples_per_s")[1], _series(train, "tokens_per_s")[1]
    step_time = _series(train, "step_time_s")[1]
    wait = _data_wait(train)[1]
    if sps or tps:
        lines.append(f"- throughput (median): {_fmt(_median(sps), 3)} samples/s, {_fmt(_median(tps), 4)} tokens/s, "
                     f"{_fmt(_median(step_time), 3)} s/step" +
                     (f", waiting for data {_median(wait):.0%} of the step" if wait else ""))
    mfu_values, mem = _series(train, "mfu")[1], _series(train, "peak_memory_gb")[1]
    if mfu_values:
        lines.append(f"- MFU (median): {_median(mfu_values):.1%}")
    if mem:
        lines.append(f"- peak memory: {max(mem):.1f} GiB")

    lines += ["", "## Plots", ""]
    if plots.written:
        for name, title in plots.written:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    else:
        lines += ["(no numeric metrics to plot yet)", ""]

    latest = _latest_samples(run_dir)
    lines += ["## Validation samples", ""]
    if latest is None:
        lines.append("None yet (set validation.prompts and validation.every to sample during training).")
    else:
        step, folder, records = latest
        lines.append(f"Latest: step {step} (`{folder}`)")
        lines.append("")
        for r in records:
            rel = os.path.relpath(folder / str(r["file"]), out_dir)
            prompt = r.get("prompt")
            label = f"{r['file']}" + (f": \"{prompt}\"" if prompt else "") + \
                (f" (conditioned on `{r['image']}`)" if r.get("image") else "") + \
                (f", seed {r['seed']}" if r.get("seed") is not None else "")
            if str(r["file"]).lower().endswith(".png"):
                lines += [f"- {label}", "", f"  ![{r['file']}]({rel})", ""]
            else:
                lines.append(f"- [{label}]({rel})")
    lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
