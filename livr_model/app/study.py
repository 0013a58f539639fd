"""``livr-study``: the paper's comparison in small, modes x tasks x seeds, one run directory per
cell (a finished cell is skipped, so a study resumes), then ``study.md`` / ``study.csv`` /
``study.png`` with the mean and spread over seeds of accuracy and of each probe.

Every mode gets the same budget (examples, epochs, learning rate, LoRA rank); nothing here is
tuned per mode. The default grid runs offline on the demo's tiny base in about 20 CPU minutes;
``--grid`` takes a YAML file for larger grids (on a GPU: a real model and JSONL or BLINK data).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from livr_model.modes import MODES

from .cli_errors import add_debug_flag, run_command, user_input
from .config import TrainConfig, load_yaml
from .data import SYNTHETIC_TASKS
from .demo import DEMO_LATENTS, DEMO_LR, DEMO_SEED, DEMO_SIZES, DEMO_THREADS, build_demo_base, cpu_seconds, demo_config
from .figures import draw_study_bars
from .files import atomic_write_bytes, atomic_write_json
from .models import load_trained
from .probes import METRICS_FILE, evaluate_model, learning_verdict
from .scoring import BELOW_CHANCE_MARGIN, is_below_chance, most_common_prediction
from .train import train

TINY_MODEL = "tiny"
BASE_DIR = "base"
RUNS_DIR = "runs"
CELL_FILE = "cell.json"
GRID_FILE = "grid.json"
STUDY_MD, STUDY_CSV, STUDY_PNG = "study.md", "study.csv", "study.png"
# The numbers a cell records and the study aggregates (fractions; attention is a probability mass).
METRICS = ("accuracy", "majority", "chance", "latents_removed", "bottleneck_forced", "answer_to_latent_attention",
           "distinct_answers", "cpu_seconds")
GRID_KEYS = ("model", "modes", "tasks", "seeds", "train_examples", "val_examples", "stage_epochs", "latents", "lr",
             "grad_accum", "lora_r", "eval_method", "train_overrides")
# What every cell of a study shares: a rerun may add modes, tasks and seeds, but reusing finished
# cells under other values of these would mix two budgets in one table.
CELL_SETTINGS = tuple(k for k in GRID_KEYS if k not in ("modes", "tasks", "seeds"))


@dataclasses.dataclass
class Grid:
    """What a study runs. ``tasks`` are synthetic task names or ``--data`` specs (JSONL, blink:...)."""

    model: str = TINY_MODEL
    modes: tuple = tuple(MODES)
    tasks: tuple = ("counting", "visual_correspondence")
    seeds: tuple = (0, 1)
    train_examples: int = 200
    val_examples: int = 100
    stage_epochs: tuple = (2, 3)
    latents: int = DEMO_LATENTS
    lr: float = DEMO_LR
    grad_accum: int = 4
    lora_r: int = 16
    eval_method: str = "generate"
    train_overrides: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("modes", "tasks", "seeds", "stage_epochs"):
            value = getattr(self, name)
            if isinstance(value, (str, int)) or not value:
                raise ValueError(f"grid: {name} must be a non-empty list; got {value!r}")
            setattr(self, name, tuple(value))
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"grid: modes {unknown} are not registered; registered: {list(MODES)}")
        if self.model == TINY_MODEL:
            bad = [t for t in self.tasks if t not in SYNTHETIC_TASKS]
            if bad:
                raise ValueError(f"grid: the tiny model runs synthetic tasks only ({list(SYNTHETIC_TASKS)}); got {bad}")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(self.train_overrides) - fields)
        if unknown:
            raise ValueError(f"grid: train_overrides keys {unknown} are not TrainConfig fields; known: {sorted(fields)}")


def load_grid(path) -> Grid:
    """A ``Grid`` from a YAML mapping of ``GRID_KEYS``; unknown keys are an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--grid: {str(path)!r} is not a file")
    raw = load_yaml(path.read_text(), f"--grid {path}") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"--grid {path}: expected a mapping of {list(GRID_KEYS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"--grid {path}: unknown keys {unknown}; allowed: {list(GRID_KEYS)}")
    return Grid(**raw)


def cell_dir(study_dir: Path, task: str, mode: str, seed: int) -> Path:
    safe_task = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    return Path(study_dir) / RUNS_DIR / safe_task / mode / f"seed-{seed}"


def cell_config(grid: Grid, base: str, task: str, mode: str, seed: int, out: Path) -> TrainConfig:
    settings = demo_config(DEMO_SIZES["full"])
    # One learning rate for every stage of every mode (the grid's), as the study's table was measured;
    # train_overrides may set stage2_lr.
    settings["stage2_lr"] = None
    data = f"synthetic:{task}" if task in SYNTHETIC_TASKS else task
    settings.update(
        model=base, data=data, mode=mode, seed=seed, output_dir=str(out), latents=grid.latents, lr=grid.lr,
        stage_epochs=grid.stage_epochs, grad_accum=grid.grad_accum, lora_r=grid.lora_r, lora_alpha=2 * grid.lora_r,
        eval_method=grid.eval_method, synthetic_train_size=grid.train_examples, synthetic_val_size=grid.val_examples,
        progress=False,
    )
    settings.update(grid.train_overrides)
    return TrainConfig(**settings)


def _accuracy(result: Optional[dict]) -> Optional[float]:
    return None if not result else result["average"]


def summarize_metrics(metrics: dict, cpu: float) -> dict:
    """One cell's numbers (see ``METRICS``) from ``evaluate_model``'s dict."""
    probes = metrics.get("probes") or {}
    mean = lambda d: sum(d.values()) / len(d) if d and all(v is not None for v in d.values()) else None  # noqa: E731
    verdict = learning_verdict(metrics)
    top, share = most_common_prediction(metrics.get("predictions", []))
    return {
        "accuracy": metrics["accuracy"]["average"],
        "majority": mean(metrics.get("majority", {})),
        "chance": mean(metrics.get("chance", {})),
        "latents_removed": _accuracy(probes.get("latents_removed")),
        "bottleneck_forced": _accuracy(probes.get("bottleneck_forced")),
        "answer_to_latent_attention": probes.get("answer_to_latent_attention"),
        "distinct_answers": len({r["prediction"] for r in metrics.get("predictions", []) if r["prediction"] is not None}),
        "learned": verdict.learned,
        "below_chance": verdict.below_chance,
        "top_answer": top,
        "top_answer_share": share,
        "cpu_seconds": cpu,
    }


def run_cell(grid: Grid, base: str, task: str, mode: str, seed: int, out: Path) -> dict:
    """Train and evaluate one cell; writes ``cell.json`` last, which marks the cell finished."""
    started_cpu, started = cpu_seconds(), time.perf_counter()
    with user_input():
        cfg = cell_config(grid, base, task, mode, seed, out)
    result = train(cfg)
    run = load_trained(out)
    metrics = evaluate_model(run.model, run.handle, run.encoder, result.val_examples, method=cfg.eval_method,
                             rule=cfg.eval_rule, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                             output_dir=out, verbose=False)
    record = {"task": task, "mode": mode, "seed": seed, "wall_seconds": time.perf_counter() - started}
    record.update(summarize_metrics(metrics, cpu_seconds() - started_cpu))
    atomic_write_json(out / CELL_FILE, record)
    return record


def collect(study_dir) -> List[dict]:
    """Every finished cell's record under ``study_dir``."""
    return [json.loads(p.read_text()) for p in sorted((Path(study_dir) / RUNS_DIR).glob(f"*/*/*/{CELL_FILE}"))]


def _mean_std(values: Sequence[float]) -> tuple:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    # Sample standard deviation over seeds (0 for a single seed).
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _below_chance(cell: dict) -> bool:
    """The cell's below-chance flag; cells recorded before the flag existed are judged from their numbers."""
    if "below_chance" in cell:
        return bool(cell["below_chance"])
    return cell.get("chance") is not None and is_below_chance(cell["accuracy"], cell["chance"])


def _top_answers(cells: Sequence[dict]) -> str:
    return "; ".join(f"seed {c['seed']}: {c['top_answer']!r} on {100 * c['top_answer_share']:.0f}%"
                     for c in cells if c.get("top_answer") is not None)


def aggregate(records: Sequence[dict]) -> List[dict]:
    """One row per (task, mode), in first-seen order: seeds, and mean / std over seeds of every metric."""
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["mode"]), []).append(r)
    rows = []
    order = {name: i for i, name in enumerate(MODES)}
    keys = sorted(groups, key=lambda k: (list(dict.fromkeys(t for t, _ in groups)).index(k[0]), order.get(k[1], len(order)), k[1]))
    for task, mode in keys:
        cells = groups[(task, mode)]
        row = {"task": task, "mode": mode, "seeds": len(cells), "learned": sum(bool(c.get("learned")) for c in cells),
               "below_chance": sum(_below_chance(c) for c in cells)}
        for name in METRICS:
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([c.get(name) for c in cells])
        row["top_answers"] = _top_answers(cells)
        rows.append(row)
    return rows


def _pct(mean, std) -> str:
    return "-" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def study_markdown(rows: Sequence[dict]) -> str:
    header = ("| task | mode | seeds | learned | accuracy % | majority % | latents removed % | bottleneck forced % "
              "| answer->latent attention | CPU s / run |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        attention = "-" if r["answer_to_latent_attention_mean"] is None else (
            f"{r['answer_to_latent_attention_mean']:.3f} ± {r['answer_to_latent_attention_std']:.3f}")
        cpu = "-" if r["cpu_seconds_mean"] is None else f"{r['cpu_seconds_mean']:.0f}"
        lines.append(f"| {r['task']} | {r['mode']} | {r['seeds']} | {r['learned']}/{r['seeds']} "
                     f"| {_pct(r['accuracy_mean'], r['accuracy_std'])} | {_pct(r['majority_mean'], r['majority_std'])} "
                     f"| {_pct(r['latents_removed_mean'], r['latents_removed_std'])} "
                     f"| {_pct(r['bottleneck_forced_mean'], r['bottleneck_forced_std'])} | {attention} | {cpu} |")
    below = [r for r in rows if r.get("below_chance")]
    if below:
        lines += ["", f"Below chance (accuracy at least {100 * BELOW_CHANCE_MARGIN:.0f} points under it): these cells "
                      "prefer wrong answers systematically; they did not guess. README.md, section \"The study\", "
                      "explains the default grid's case."]
        for r in below:
            top = f"; most common answer {r['top_answers']}" if r.get("top_answers") else ""
            lines.append(f"- {r['task']} / {r['mode']}: {r['below_chance']} of {r['seeds']} seeds, accuracy "
                         f"{_pct(r['accuracy_mean'], r['accuracy_std'])}% against chance {100 * r['chance_mean']:.1f}%{top}")
    return "\n".join(lines) + "\n"


def write_study(study_dir, records: Sequence[dict], *, title: str = "") -> List[dict]:
    """``study.csv``, ``study.md`` and ``study.png`` in ``study_dir`` from the cell records."""
    study_dir = Path(study_dir)
    rows = aggregate(records)
    if not rows:
        raise ValueError(f"no finished cells under {study_dir / RUNS_DIR}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(study_dir / STUDY_CSV, buffer.getvalue().encode())
    text = (f"# {title or 'livr-study'}\n\nMean ± standard deviation over seeds; accuracies in %, "
            "chance and the majority-class rate alongside.\n\n" + study_markdown(rows))
    atomic_write_bytes(study_dir / STUDY_MD, text.encode())
    chance = {r["task"]: r["chance_mean"] for r in rows}
    draw_study_bars(rows, study_dir / STUDY_PNG, chance=chance, title=title or "livr-study")
    return rows


def check_cell_settings(grid: Grid, study_dir) -> None:
    """Refuse a grid whose ``CELL_SETTINGS`` differ from those the study's finished cells ran with
    (its ``grid.json``): they would be skipped as finished and reported under the new settings."""
    study_dir = Path(study_dir)
    if not (study_dir / GRID_FILE).is_file() or not collect(study_dir):
        return
    saved = json.loads((study_dir / GRID_FILE).read_text())
    now = json.loads(json.dumps(dataclasses.asdict(grid)))
    changed = [k for k in CELL_SETTINGS if saved.get(k) != now[k]]
    if changed:
        was = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
        raise ValueError(f"--output-dir {str(study_dir)!r}: its finished cells ran with {was}, this grid has "
                         f"{', '.join(f'{k}={now[k]!r}' for k in changed)}; use another --output-dir (or delete "
                         f"{str(study_dir / RUNS_DIR)!r} to run every cell again)")


def run_study(grid: Grid, study_dir, *, log=print) -> List[dict]:
    """Run every unfinished cell of ``grid`` under ``study_dir``, then aggregate."""
    study_dir = Path(study_dir)
    check_cell_settings(grid, study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(study_dir / GRID_FILE, dataclasses.asdict(grid))
    base = grid.model
    if grid.model == TINY_MODEL:
        base_dir = study_dir / BASE_DIR
        if not (base_dir / "config.json").is_file():
            build_demo_base(base_dir, DEMO_SIZES["full"], seed=DEMO_SEED)
        base = str(base_dir.resolve())
    cells = [(t, m, s) for t in grid.tasks for s in grid.seeds for m in grid.modes]
    for index, (task, mode, seed) in enumerate(cells, 1):
        out = cell_dir(study_dir, task, mode, seed)
        if (out / CELL_FILE).is_file():
            log(f"study: [{index}/{len(cells)}] {task} / {mode} / seed {seed}: finished before, skipped")
            continue
        record = run_cell(grid, base, task, mode, seed, out)
        below = ", BELOW CHANCE" if _below_chance(record) else ""
        log(f"study: [{index}/{len(cells)}] {task} / {mode} / seed {seed}: accuracy {100 * record['accuracy']:.1f}%{below} "
            f"({record['cpu_seconds']:.0f}s CPU)")
    title = f"livr-study: {len(grid.modes)} modes x {len(grid.tasks)} tasks x {len(grid.seeds)} seeds, model {grid.model}"
    rows = write_study(study_dir, collect(study_dir), title=title)
    log(study_markdown(rows))
    return rows


def build_study_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livr-study", description=(
        "Compare the modes (sft, livr, latents-only, mask-only, image-twice, ...) over tasks and seeds; one run "
        "directory per cell, finished cells are skipped; writes study.md, study.csv and study.png."))
    p.add_argument("--output-dir", default="study_out", help="where the runs and the tables go (default: study_out)")
    p.add_argument("--grid", default=None, help="YAML file with any of: " + ", ".join(GRID_KEYS))
    p.add_argument("--modes", nargs="+", default=None, help="override the grid's modes")
    p.add_argument("--tasks", nargs="+", default=None, help="override the grid's tasks")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="override the grid's seeds")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild study.md/csv/png from finished cells")
    add_debug_flag(p)
    return p


def study_main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(build_study_parser(), _study, argv)


def _study(args: argparse.Namespace) -> int:
    with user_input():
        grid = load_grid(args.grid) if args.grid else Grid()
        overrides = {k: v for k, v in (("modes", args.modes), ("tasks", args.tasks), ("seeds", args.seeds)) if v}
        if overrides:
            grid = Grid(**{**dataclasses.asdict(grid), **overrides})
        if args.aggregate_only:
            records = collect(args.output_dir)
            if not records:
                raise ValueError(f"--aggregate-only: no finished cells under {Path(args.output_dir) / RUNS_DIR}")
        else:
            check_cell_settings(grid, args.output_dir)
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.aggregate_only:
        rows = write_study(args.output_dir, records)
        print(study_markdown(rows), flush=True)
        return 0
    if "OMP_NUM_THREADS" not in os.environ and grid.model == TINY_MODEL:
        torch.set_num_threads(DEMO_THREADS)
    run_study(grid, args.output_dir, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(study_main())
