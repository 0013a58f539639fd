"""Figures (matplotlib, drawn off-screen): the latent-to-image attention over the input images, the
training curves of a run, and the study's accuracy per mode."""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .files import atomic_write_bytes  # noqa: E402

HEATMAP_ALPHA = 0.75
HEATMAP_CMAP = "inferno"
PANEL_INCHES = 2.4
# Panels per row of the attention figure (K=16 latents would make one unreadable strip).
MAX_COLUMNS = 6
TITLE_WIDTH = 90
DPI = 110
# The moving average drawn over the raw per-step loss, in optimizer steps.
LOSS_SMOOTHING = 20
STAGE_COLORS = ("tab:blue", "tab:orange", "tab:green")
BAR_WIDTH = 0.8


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _as_panels(heat: torch.Tensor) -> list:
    """(rows, cols) -> one panel; (K, rows, cols) -> one panel per latent plus their mean."""
    heat = heat.detach().float().cpu()
    if heat.dim() == 2:
        return [("mean of the latents", heat)]
    if heat.dim() != 3:
        raise ValueError(f"an attention map must be (rows, cols) or (latents, rows, cols); got shape {tuple(heat.shape)}")
    panels = [(f"latent {k + 1}", heat[k]) for k in range(heat.shape[0])]
    return panels + [(f"mean of {heat.shape[0]} latents", heat.mean(dim=0))]


def draw_heatmap(images: Sequence, maps: Sequence[torch.Tensor], path, *, title: Optional[str] = None) -> Path:
    """The attention maps over their images: one row per image, holding the input image, then one
    panel per latent token plus their mean (one panel per image for 2-D maps). Under the heat the
    image is drawn in gray, so the colour is only attention; one colour scale for all panels, with
    a colour bar. Written as a PNG; returns its path."""
    if len(images) != len(maps):
        raise ValueError(f"images and maps must pair up; got {len(images)} images and {len(maps)} maps")
    if not maps:
        raise ValueError("maps must hold at least one attention map")
    per_image = [_as_panels(m) for m in maps]
    per_latent = maps[0].dim() == 3
    values = [p for panels in per_image for _, p in panels]
    vmin, vmax = min(float(p.min()) for p in values), max(float(p.max()) for p in values)
    if vmax <= vmin:
        vmax = vmin + 1e-6
    # Per-latent maps: rows of at most MAX_COLUMNS panels per image (the image itself, then its
    # panels); 2-D maps: images side by side.
    if per_latent:
        cols = min(MAX_COLUMNS, 1 + len(per_image[0]))
        rows_per_image = math.ceil((1 + len(per_image[0])) / cols)
        rows = rows_per_image * len(images)
    else:
        rows, cols, rows_per_image = 1, len(images), 1
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES * cols + 1.2, PANEL_INCHES * rows + 1.0), squeeze=False)
    slots = lambda i: [axes[i * rows_per_image + k // cols][k % cols] for k in range(rows_per_image * cols)]  # noqa: E731
    shown = None
    for i, image in enumerate(images):
        pixels = np.asarray(image.convert("RGB"))
        gray = np.asarray(image.convert("L"))
        height, width = pixels.shape[:2]
        extent = (0, width, height, 0)
        if per_latent:
            own = slots(i)
            own[0].imshow(pixels, extent=extent, interpolation="nearest")
            own[0].set_title("input image" if len(images) == 1 else f"input image {i + 1}", fontsize=9)
            targets = [(own[j + 1], name, heat) for j, (name, heat) in enumerate(per_image[i])]
            for unused in own[1 + len(per_image[i]):]:
                unused.axis("off")
        else:
            targets = [(axes[0][i], f"image {i + 1}", per_image[i][0][1])]
        for ax, name, heat in targets:
            ax.imshow(gray, extent=extent, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            # One cell per merged image token: nearest keeps the token grid visible.
            shown = ax.imshow(heat.numpy(), extent=extent, cmap=HEATMAP_CMAP, alpha=HEATMAP_ALPHA, vmin=vmin, vmax=vmax,
                              interpolation="nearest")
            ax.set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
    bar.set_label("attention probability\n(low: dark, high: bright)", fontsize=8)
    if title:
        fig.suptitle(textwrap.fill(title, TITLE_WIDTH), fontsize=9)
    return _save(fig, path)


def _moving_average(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    smooth = np.convolve(values, kernel, mode="valid")
    return np.concatenate([np.full(window - 1, np.nan), smooth])


def draw_training_curves(steps: Sequence[dict], epochs: Sequence[dict], path, *, chance: Optional[float] = None,
                         title: Optional[str] = None) -> Path:
    """Loss per optimizer step (raw and a moving average) and validation accuracy per epoch, both
    against the global step, coloured by stage with the stage boundaries marked.

    ``steps``: ``{"step", "stage", "loss"}`` dicts; ``epochs``: ``{"global_step", "stage", "val_accuracy"}``
    (and ``stage_rule_accuracy``, drawn dashed, where a stage trains under another rule than validation's).
    """
    if not steps:
        raise ValueError("steps must hold at least one {'step', 'stage', 'loss'} record")
    stages = list(dict.fromkeys(s["stage"] for s in steps))
    colors = {name: STAGE_COLORS[i % len(STAGE_COLORS)] for i, name in enumerate(stages)}
    fig, (loss_ax, acc_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    x = np.array([s["step"] for s in steps])
    loss = np.array([s["loss"] for s in steps], dtype=float)
    for name in stages:
        mask = np.array([s["stage"] == name for s in steps])
        loss_ax.plot(x[mask], loss[mask], color=colors[name], alpha=0.25, linewidth=0.8)
        loss_ax.plot(x[mask], _moving_average(loss[mask], LOSS_SMOOTHING), color=colors[name], linewidth=2,
                     label=f"{name} ({LOSS_SMOOTHING}-step mean)")
    loss_ax.set_ylabel("answer loss")
    loss_ax.set_yscale("log")
    loss_ax.legend(fontsize=8)
    loss_ax.grid(alpha=0.3)
    scored = [e for e in epochs if e.get("val_accuracy") is not None]
    for name in stages:
        points = [e for e in scored if e["stage"] == name]
        if points:
            acc_ax.plot([e["global_step"] for e in points], [100 * e["val_accuracy"] for e in points], "o-",
                        color=colors[name], label=name)
        own = [e for e in epochs if e["stage"] == name and e.get("stage_rule_accuracy") is not None]
        if own:
            acc_ax.plot([e["global_step"] for e in own], [100 * e["stage_rule_accuracy"] for e in own], "s--",
                        color=colors[name], label=f"{name}, scored under its training rule")
    if chance is not None:
        acc_ax.axhline(100 * chance, color="gray", linestyle=":", label=f"chance {100 * chance:.0f}%")
    acc_ax.set_ylim(0, 105)
    acc_ax.set_ylabel("validation accuracy (%)")
    acc_ax.set_xlabel("optimizer step")
    acc_ax.grid(alpha=0.3)
    for previous, current in zip(steps, steps[1:]):
        if current["stage"] != previous["stage"]:
            boundary = (previous["step"] + current["step"]) / 2
            for ax in (loss_ax, acc_ax):
                ax.axvline(boundary, color="black", linestyle="--", linewidth=1)
            acc_ax.annotate(f"{previous['stage']} | {current['stage']}", (boundary, 4), ha="center", fontsize=8,
                            backgroundcolor="white")
    # Centre right: accuracy points sit high, chance low, and the stage label at the bottom of the boundary.
    acc_ax.legend(fontsize=8, loc="center right")
    fig.suptitle(textwrap.fill(title or "training curves", TITLE_WIDTH), fontsize=10)
    return _save(fig, path)


def _study_panel(ax, rows: Sequence[dict], metric: str, chance: Optional[dict], legend: bool) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    cmap = plt.get_cmap("tab10")
    width = BAR_WIDTH / len(modes)
    for m, mode in enumerate(modes):
        for t, task in enumerate(tasks):
            row = next((r for r in rows if r["task"] == task and r["mode"] == mode), None)
            x = t + (m - (len(modes) - 1) / 2) * width
            if row is None or row.get(f"{metric}_mean") is None:
                ax.text(x, 2, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
                continue
            mean, std = 100 * row[f"{metric}_mean"], 100 * (row.get(f"{metric}_std") or 0.0)
            ax.bar(x, mean, width * 0.95, yerr=std, capsize=3, color=cmap(m % 10), label=mode if t == 0 else None)
            ax.text(x, 1, f"n={row['seeds']}", ha="center", va="bottom", fontsize=6, rotation=90, color="white")
    if chance:
        for t, task in enumerate(tasks):
            if chance.get(task) is not None:
                ax.hlines(100 * chance[task], t - BAR_WIDTH / 2, t + BAR_WIDTH / 2, colors="black", linestyles=":",
                          label="chance" if t == 0 else None)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylim(0, 105)
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)\nmean ± std over seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if legend:
        ax.legend(fontsize=8, ncol=min(len(modes) + 1, 6), loc="upper center", bbox_to_anchor=(0.5, -0.12))


def draw_study_bars(summary: Sequence[dict], path, *, metrics: Sequence[str] = ("accuracy", "bottleneck_forced"),
                    chance: Optional[dict] = None, title: Optional[str] = None) -> Path:
    """One panel per metric (accuracy, then the probes), grouped bars: one group per task, one bar
    per mode, height = mean over seeds (in %), error bar = standard deviation, seed count in the bar;
    "n/a" where a mode has no such probe.

    ``summary``: ``{"task", "mode", metric + "_mean", metric + "_std", "seeds"}`` dicts.
    """
    if not any(r.get(f"{metrics[0]}_mean") is not None for r in summary):
        raise ValueError(f"summary holds no {metrics[0]!r} values to plot")
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    modes = list(dict.fromkeys(r["mode"] for r in summary))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(7.0, 0.6 * len(tasks) * len(modes) + 2), 3.6 * len(metrics)),
                             squeeze=False)
    for i, metric in enumerate(metrics):
        _study_panel(axes[i][0], summary, metric, chance, legend=i == len(metrics) - 1)
        axes[i][0].set_title(f"{metric.replace('_', ' ')} per mode and task", fontsize=9)
    fig.suptitle(textwrap.fill(title or "livr-study", TITLE_WIDTH), fontsize=10)
    return _save(fig, path)
