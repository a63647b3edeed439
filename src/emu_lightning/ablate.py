"""``emu-lightning ablate``: train a base config and each variant for the same budget over seeds, then one report.

    emu-lightning ablate --config configs/tiny.yaml --config configs/stages/pretrain.yaml \\
        --variant configs/ablations/resampler-perceiver.yaml --variant configs/ablations/resampler-mlp.yaml \\
        --variant configs/ablations/resampler-pooled.yaml --seeds 2 --out runs/ablate/resampler

Every run is ``emu-lightning fit --config <base>... [--config <variant>] --config <run folder>/run.yaml`` in a
process of its own (a failure or a leak in one touches no other). ``run.yaml`` sets the seed, the run folder, a CSV
and a TensorBoard logger and, unless ``--keep-time-limit``, drops the config's ``max_time``: every run then trains
the same number of steps, however busy the machine is, and the table says how many each reached. The base and the
variants run the same evaluation callbacks (the base config's, unless a variant changes them).

A run whose ``result.json`` exists is skipped; one that stopped early (killed, preempted) resumes from its
``last.ckpt``. So the command can be run again after an interruption, or with more variants or seeds, and only the
missing runs train.

Writes, under ``--out``:

- ``<variant>/seed<k>/``: the run (``run.yaml``, ``fit.log``, ``metrics.csv``, checkpoints, ``eval/`` reports) and
  its ``result.json`` (steps, step time, parameters, final metrics, curves);
- ``report.md`` and ``report.csv``: one row per variant, mean and standard deviation over seeds of the final
  losses, every evaluation score, the step time and the steps reached, and the parameter counts;
- ``curves.png``: each evaluation score (and the held-out loss) over training steps, mean over seeds with a band of
  one standard deviation.

From Python: :func:`load_results`, :func:`summarize`, :func:`plot_curves`, :func:`write_report`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BASE = "base"
"""The name of the run with the base config alone (``--base-name`` changes it)."""
TRAIN_TAIL = 5
"""Final training losses are the mean of this many last logged values (one logged value is one noisy batch)."""


@dataclass(frozen=True)
class Run:
    """One training run of the ablation: a variant (or the base) at a seed."""

    variant: str
    seed: int
    configs: tuple[str, ...]
    folder: Path

    @property
    def result_path(self) -> Path:
        return self.folder / "result.json"


def plan(
    configs: Sequence[str], variants: Sequence[str], seeds: Sequence[int], out: str | Path, base_name: str = BASE
) -> list[Run]:
    """The runs, seed by seed and variant by variant: the base config first, then each variant file on top of it.
    A variant is named by its file's stem (``resampler-perceiver``); two variants may not share a name."""
    if not configs:
        raise ValueError("ablate needs the base config (--config)")
    for path in [*configs, *variants]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path!r} does not exist")
    names = [base_name] + [Path(v).stem for v in variants]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"variants must have different names (file stems); repeated: {duplicated}")
    if not seeds:
        raise ValueError("ablate needs at least one seed")
    stacks = [tuple(configs)] + [(*configs, v) for v in variants]
    out = Path(out)
    # Seed by seed: an ablation cut short has every variant at its first seeds rather than some at none.
    return [Run(name, seed, stack, out / name / f"seed{seed}") for seed in seeds for name, stack in zip(names, stacks)]


def run_overlay(run: Run, max_steps: int | None, keep_time_limit: bool) -> dict[str, Any]:
    """What ``run.yaml`` sets on top of the run's configs."""
    folder = str(run.folder)
    trainer: dict[str, Any] = {
        "default_root_dir": folder,
        "logger": [
            {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": folder, "name": "", "version": ""},
            },  # fmt: skip
            {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": folder, "name": "tensorboard", "version": ""},
            },  # fmt: skip
        ],
    }
    if not keep_time_limit:
        trainer["max_time"] = None
    if max_steps is not None:
        trainer["max_steps"] = max_steps
    return {"seed_everything": run.seed, "trainer": trainer}


def fit_command(run: Run, extra: Sequence[str] = (), ckpt_path: Path | None = None) -> list[str]:
    args = [sys.executable, "-m", "emu_lightning.cli", "fit"]
    for config in (*run.configs, str(run.folder / "run.yaml")):
        args += ["--config", config]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    return args + list(extra)


def last_checkpoint(run: Run) -> Path | None:
    found = sorted(run.folder.glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def train(run: Run, extra: Sequence[str], max_steps: int | None, keep_time_limit: bool) -> float:
    """Train one run in its own process (output to ``fit.log``), resuming from its last.ckpt; returns seconds."""
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "run.yaml").write_text(yaml.safe_dump(run_overlay(run, max_steps, keep_time_limit), sort_keys=False))
    resume = last_checkpoint(run)
    if (run.folder / "metrics.csv").is_file():  # the CSV logger starts its file afresh: keep the earlier attempt's
        (run.folder / "metrics.csv").rename(run.folder / f"metrics-part{len(metric_files(run)) - 1}.csv")
    command = fit_command(run, extra, resume)
    start = time.perf_counter()
    with open(run.folder / "fit.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    if code != 0:
        tail = (run.folder / "fit.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{run.variant} seed {run.seed} failed (exit {code}); end of {run.folder / 'fit.log'}:\n"
                           + "\n".join(tail))  # fmt: skip
    return time.perf_counter() - start


def metric_files(run: Run) -> list[Path]:
    """The run's CSV metrics, oldest first: ``metrics-part<k>.csv`` per interrupted attempt, then ``metrics.csv``."""
    parts = sorted(run.folder.glob("metrics-part*.csv"), key=lambda p: int(p.stem.removeprefix("metrics-part")))
    current = run.folder / "metrics.csv"
    return parts + ([current] if current.is_file() else [])


def read_metrics(*paths: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Each metric of CSVLogger ``metrics.csv`` files as ``(step, value)`` pairs by step (empty cells skipped). A
    step logged again (an attempt resumed from a checkpoint older than its last logged step) keeps the later value.

    ``step`` counts optimizer steps taken, as ``trainer.global_step`` and the evaluation reports do: the file's own
    column is one less (Lightning logs a training step's metrics, and a validation after step ``n``, at ``n - 1``).
    """
    by_step: dict[str, dict[int, float]] = {}
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = int(float(row["step"])) + 1
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        by_step.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in by_step.items()}


def is_score(metric: str) -> bool:
    """Metrics the report and the plot show: held-out losses and evaluation scores (not their spreads over
    evaluation seeds, which the report replaces by the spread over training seeds)."""
    return metric.startswith(("val/", "eval/")) and not metric.endswith("_std")


def collect(run: Run, seconds: float | None, planned_steps: int | None, params: dict[str, int]) -> dict[str, Any]:
    """The run's ``result.json``: steps reached, median step time, final metrics and curves."""
    files = metric_files(run)
    if not files:
        raise FileNotFoundError(f"no {run.folder / 'metrics.csv'}: the run logged nothing (it needs its CSV logger)")
    curves = read_metrics(*files)
    final: dict[str, float] = {}
    for key, points in curves.items():
        if is_score(key):
            final[key] = points[-1][1]
        elif key.startswith("train/") and key != "train/step_time":
            final[key] = statistics.fmean(v for _, v in points[-TRAIN_TAIL:])
    for prefix in ("train/", "val/"):  # the objective is ce + weight x mse: the parts say more than their sum
        if f"{prefix}ce" in final and f"{prefix}mse" in final:
            final.pop(f"{prefix}loss", None)
            curves.pop(f"{prefix}loss", None)
    step_times = [v for _, v in curves.get("train/step_time", [])]
    return {
        "variant": run.variant,
        "seed": run.seed,
        "configs": list(run.configs),
        "steps": steps_reached(run, curves),
        "planned_steps": planned_steps,
        "step_time": statistics.median(step_times) if step_times else None,
        "seconds": seconds,
        **params,
        "final": final,
        "curves": {k: [list(p) for p in v] for k, v in curves.items() if is_score(k)},
    }


def steps_reached(run: Run, curves: dict[str, list[tuple[int, float]]]) -> int:
    """The steps the run's final weights were trained for (``FinalCheckpoint``'s marker), else the last logged."""
    marker = run.folder / ".final.ckpt.json"
    if marker.is_file():
        return int(json.loads(marker.read_text())["step"])
    return max((s for points in curves.values() for s, _ in points), default=0)


def count_params(configs: Sequence[str], extra: Sequence[str] = ()) -> dict[str, int]:
    """Parameters of the model the configs build (on the meta device: nothing is allocated)."""
    from emu_lightning.inspect import build
    from emu_lightning.memory import param_counts

    model, _ = build([a for c in configs for a in ("--config", c)] + list(extra), device="meta")
    total, trainable = param_counts(model)
    return {"params": total, "trainable_params": trainable}


def load_results(out: str | Path) -> list[dict[str, Any]]:
    """Every ``result.json`` under ``out``, sorted by the order the runs were made in (then seed)."""
    out = Path(out)
    results = [json.loads(p.read_text()) for p in out.glob("*/seed*/result.json")]
    order = _variant_order(out)
    return sorted(results, key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["seed"]))


def _variant_order(out: Path) -> dict[str, int]:
    path = out / "variants.json"
    return {name: i for i, name in enumerate(json.loads(path.read_text()))} if path.is_file() else {}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: ``variant``, ``seeds``, ``params``, ``trainable_params``, and for ``steps``,
    ``step_time`` and every final metric a ``(mean, std)`` pair over seeds (std 0 for one seed)."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    rows = []
    for variant, runs in by_variant.items():
        row: dict[str, Any] = {"variant": variant, "seeds": len(runs), "params": runs[0].get("params"),
                               "trainable_params": runs[0].get("trainable_params")}  # fmt: skip
        for key in ("steps", "step_time"):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = _mean_std(values) if values else None
        metrics = sorted({k for r in runs for k in r["final"]}, key=_metric_order)
        for key in metrics:
            values = [r["final"][key] for r in runs if key in r["final"]]
            row[key] = _mean_std(values)
        rows.append(row)
    return rows


def _metric_order(key: str) -> tuple[int, str]:
    return ({"train": 0, "val": 1, "eval": 2}.get(key.split("/")[0], 3), key)


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys = sorted({k for row in rows for k in row if "/" in k}, key=_metric_order)
    return keys


def _fmt(pair: tuple[float, float] | None, seeds: int, digits: int = 3) -> str:
    """``mean ± std`` (the mean alone for one seed); one decimal from 10 up (CIDEr, accuracies), else three."""
    if pair is None:
        return ""
    mean, std = pair
    digits = 1 if abs(mean) >= 10 else digits
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if seeds > 1 else "")


def report_markdown(rows: Sequence[dict[str, Any]], planned_steps: int | None = None, command: str = "") -> str:
    columns = _columns(rows)
    lines = []
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        "Mean ± standard deviation over training seeds of each run's final values: training losses are the mean of "
        f"the last {TRAIN_TAIL} logged values, held-out losses and evaluation scores the last evaluation's; the "
        "step time is the median seconds per training step (forward, backward, optimizer)."
        + (f" Planned steps per run: {planned_steps}." if planned_steps else ""),
        "",
    ]
    header = ["variant", "seeds", "params (M)", "steps", "step time (s)", *columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        params = f"{row['params'] / 1e6:.2f}" if row.get("params") else ""
        steps = f"{row['steps'][0]:.0f}" if row.get("steps") else ""
        if row.get("steps") and row["steps"][1]:
            steps += f" ± {row['steps'][1]:.0f}"
        n = row["seeds"]
        cells = [row["variant"], str(n), params, steps, _fmt(row.get("step_time"), n),
                 *(_fmt(row.get(c), n) for c in columns)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    columns = ["steps", "step_time", *_columns(rows)]
    header = ["variant", "seeds", "params", "trainable_params"] + [f"{c}_{s}" for c in columns for s in ("mean", "std")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            values = [row["variant"], row["seeds"], row.get("params"), row.get("trainable_params")]
            for c in columns:
                values += list(row[c]) if row.get(c) is not None else ["", ""]
            writer.writerow(values)


def plot_curves(results: Sequence[dict[str, Any]], path: str | Path | None = None) -> Any:
    """A matplotlib figure: one panel per held-out loss and evaluation score over training steps, one line per
    variant (the mean over seeds at each evaluated step, with a band of one standard deviation). Saved as PNG
    when ``path`` is given."""
    import matplotlib

    if path is not None and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")  # writing a file needs no display
    import matplotlib.pyplot as plt

    metrics = sorted({k for r in results for k in r["curves"]}, key=_metric_order)
    if not metrics:
        raise ValueError("no curves to plot: the runs logged no held-out loss or evaluation score")
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    variants = list(dict.fromkeys(r["variant"] for r in results))
    for ax, metric in zip(axes.flat, metrics):
        for i, variant in enumerate(variants):
            by_step: dict[int, list[float]] = {}
            for r in results:
                if r["variant"] == variant:
                    for step, value in r["curves"].get(metric, []):
                        by_step.setdefault(int(step), []).append(value)
            if not by_step:
                continue
            steps = sorted(by_step)
            stats = [_mean_std(by_step[s]) for s in steps]
            mean = [m for m, _ in stats]
            color = f"C{i}"
            ax.plot(steps, mean, marker="o", markersize=3, color=color, label=variant)
            ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], color=color, alpha=0.2)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def write_report(out: str | Path, planned_steps: int | None = None, command: str = "") -> list[dict[str, Any]]:
    """``report.md``, ``report.csv`` and ``curves.png`` from the results under ``out``; returns the rows."""
    out = Path(out)
    results = load_results(out)
    if not results:
        raise FileNotFoundError(f"no results under {out} (expected <variant>/seed<k>/result.json)")
    rows = summarize(results)
    markdown = report_markdown(rows, planned_steps, command)
    if any(r["curves"] for r in results):
        plot_curves(results, out / "curves.png")
        markdown += "\n![evaluation curves](curves.png)\n"
    (out / "report.md").write_text(markdown)
    write_csv(rows, out / "report.csv")
    return rows


def planned_steps(configs: Sequence[str], max_steps: int | None) -> int | None:
    """The run's ``trainer.max_steps``: ``--max-steps``, else the last config that sets it."""
    if max_steps is not None:
        return max_steps
    steps = None
    for path in configs:
        trainer = (yaml.safe_load(Path(path).read_text()) or {}).get("trainer") or {}
        steps = trainer.get("max_steps", steps)
    return steps


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="emu-lightning ablate",
        description="Train a base config and each variant for the same budget over seeds; write one report.",
        epilog="Arguments after `--` go to every `emu-lightning fit` (e.g. -- --trainer.val_check_interval 200).",
    )
    p.add_argument("--config", action="append", required=True, help="the base config (repeat to stack overlays)")
    p.add_argument("--variant", action="append", default=[], help="a variant overlay on the base (repeatable)")
    p.add_argument("--seeds", type=int, default=1, help="runs per variant, with seed_everything 0 .. N-1")
    p.add_argument("--out", default=None, help="the ablation folder (default: runs/ablate/<first variant's stem>)")
    p.add_argument("--base-name", default=BASE, help=f"the base run's name in the report (default: {BASE})")
    p.add_argument("--max-steps", type=int, default=None, help="training steps per run (default: the config's)")
    p.add_argument("--keep-time-limit", action="store_true",
                   help="keep the config's trainer.max_time (runs may then reach different steps)")  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="write the report from the results already there")
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps {args.max_steps}: at least 1")
    if args.out is None:
        args.out = str(Path("runs") / "ablate" / (Path(args.variant[0]).stem if args.variant else args.base_name))
    return args, extra


def main(argv: Sequence[str]) -> int:
    """``emu-lightning ablate`` with its arguments (``argv``, without the subcommand); the exit status."""
    args, extra = parse_args(argv)
    out = Path(args.out)
    try:
        runs = plan(args.config, args.variant, range(args.seeds), out, args.base_name)
    except (ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    known = json.loads((out / "variants.json").read_text()) if (out / "variants.json").is_file() else []
    order = known + [name for name in dict.fromkeys(r.variant for r in runs) if name not in known]
    (out / "variants.json").write_text(json.dumps(order))
    steps = planned_steps(args.config, args.max_steps)
    command = "emu-lightning ablate " + " ".join(argv)
    failed: list[str] = []
    params: dict[str, dict[str, int]] = {}
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {run.variant} seed {run.seed}"
        if args.report_only or run.result_path.is_file():
            print(f"{label}: {'result there' if run.result_path.is_file() else 'not run'}", flush=True)
            continue
        resume = last_checkpoint(run)
        print(f"{label}: training{' (resuming ' + str(resume) + ')' if resume else ''}; log {run.folder / 'fit.log'}",
              flush=True)  # fmt: skip
        try:
            if run.variant not in params:
                params[run.variant] = count_params(run.configs, extra)
            seconds = train(run, extra, args.max_steps, args.keep_time_limit)
            result = collect(run, seconds, steps, params[run.variant])
        except Exception as err:  # one failed run does not stop the others; the report lists what is there
            failed.append(f"{run.variant} seed {run.seed}")
            print(f"{label}: FAILED: {err}", file=sys.stderr, flush=True)
            continue
        run.result_path.write_text(json.dumps(result, indent=1))
        scores = ", ".join(f"{k.split('/', 1)[1]} {v:.2f}" for k, v in result["final"].items() if k.startswith("eval/"))
        print(f"{label}: {result['steps']} steps in {seconds / 60:.1f} min" + (f"; {scores}" if scores else ""),
              flush=True)  # fmt: skip
    if not load_results(out):
        sys.stderr.write(f"no results under {out} yet: nothing to report\n")
    else:
        write_report(out, steps, command)
        print(f"report: {out / 'report.md'}, {out / 'report.csv'}" +
              (f", {out / 'curves.png'}" if (out / "curves.png").is_file() else ""))  # fmt: skip
        print((out / "report.md").read_text())
    if failed:
        sys.stderr.write(f"failed runs (run the same command again to retry them): {', '.join(failed)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
