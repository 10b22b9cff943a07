"""Figures and tables the notebooks show (seaborn/matplotlib), each also saved as PNG under runs/<name>/figures/.

Notebooks call one function per figure so that they stay a readable report; nothing here computes results.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from utils import data, files
from utils.folds import SEVERITY_CLASSES, severity_class

sns.set_theme(style="whitegrid", context="notebook")


def save(fig: plt.Figure, figures_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """Save a figure as PNG (the notebook also displays it)."""
    return save_png(fig, Path(figures_dir) / f"{name}.png", dpi)


def save_png(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """A figure written as PNG to `path`, atomically (a killed write leaves the old file or none)."""
    with files.atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def with_severity(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["severity"] = pd.Categorical(severity_class(out["percentage"].to_numpy()), categories=SEVERITY_CLASSES,
                                     ordered=True)
    return out


def label_overview(labels: pd.DataFrame) -> plt.Figure:
    """Label histogram, severity class counts and slices per subject, side by side."""
    labels = with_severity(labels)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    sns.histplot(labels["percentage"], bins=np.arange(0, 102, 2), ax=axes[0])
    axes[0].set(title="infection percentage", xlabel="% of lung infected", ylabel="slices")
    sns.countplot(data=labels, x="severity", order=SEVERITY_CLASSES, ax=axes[1])
    axes[1].set(title="severity classes", xlabel="", ylabel="slices")
    axes[1].tick_params(axis="x", rotation=30)
    if labels["subject"].notna().any():
        per_subject = labels.groupby("subject").size()
        sns.histplot(per_subject, discrete=True, ax=axes[2])
    axes[2].set(title="slices per subject (CT scan)", xlabel="slices", ylabel="subjects")
    fig.tight_layout()
    return fig


def image_census(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Count each split's images by (size, mode, format) from their headers only (no decoding; utils.data's reader,
    so an unreadable image gets the project's error naming it)."""
    rows = [(split, *data.image_header(path)) for split, frame in splits.items() for path in frame["path"]]
    columns = ["split", "size", "mode", "format"]
    return pd.DataFrame(rows, columns=columns).value_counts(sort=False).rename("images").reset_index()


def sample_grid(frame: pd.DataFrame, images: np.ndarray, per_class: int = 4, seed: int = 0) -> plt.Figure:
    """A few slices of each severity class present, with their labels."""
    frame = with_severity(frame.reset_index(drop=True))
    classes = [c for c in SEVERITY_CLASSES if (frame["severity"] == c).any()]
    fig, axes = plt.subplots(len(classes), per_class, figsize=(2.4 * per_class, 2.5 * len(classes)), squeeze=False)
    rng = np.random.default_rng(seed)
    for row, name in zip(axes, classes):
        index = np.flatnonzero(frame["severity"].to_numpy() == name)
        picks = rng.choice(index, size=min(per_class, len(index)), replace=False)
        for ax in row:
            ax.axis("off")
        for ax, i in zip(row, picks):
            ax.imshow(images[i][..., 0], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{name}: {frame['percentage'][i]:.0f}%", fontsize=9)
    fig.tight_layout()
    return fig


def fold_severity_mix(folds: pd.DataFrame) -> plt.Figure:
    """Share of each severity class per fold, next to the whole set: stratification at a glance."""
    shares = (pd.crosstab(folds["fold"].astype(str), folds["severity"], normalize="index")
              .reindex(columns=[c for c in SEVERITY_CLASSES if c in set(folds["severity"])]))
    overall = folds["severity"].value_counts(normalize=True).reindex(shares.columns).rename("all")
    shares = pd.concat([shares, overall.to_frame().T])
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    shares.plot(kind="bar", stacked=True, ax=axes[0], colormap="viridis", width=0.8)
    axes[0].set(title="severity mix per fold", xlabel="fold", ylabel="share of slices")
    axes[0].legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    counts = folds.groupby("fold").agg(slices=("name", "size"), subjects=("subject", "nunique"))
    counts.plot(kind="bar", ax=axes[1])
    axes[1].set(title="slices and subjects per fold", xlabel="fold")
    fig.tight_layout()
    return fig


def training_curves(history: pd.DataFrame) -> plt.Figure:
    """Training loss and held-out MAE per epoch, one line per fold."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    panels = [("train_loss", "train loss"), ("valid_MAE", "held-out fold MAE"), ("lr", "learning rate")]
    style = "model" if history["model"].nunique() > 1 else None
    for ax, (column, title) in zip(axes, panels):
        if column in history:
            sns.lineplot(data=history, x="epoch", y=column, hue="fold", style=style, marker="o", ax=ax, palette="tab10")
        ax.set(title=title)
    fig.tight_layout()
    return fig


def prediction_diagnostics(merged: pd.DataFrame) -> plt.Figure:
    """Predicted vs true (with the identity line) and residuals by severity class (`merged`: prediction, percentage)."""
    merged = with_severity(merged)
    merged["residual"] = merged["prediction"] - merged["percentage"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    sns.scatterplot(data=merged, x="percentage", y="prediction", hue="severity", s=14, alpha=0.6, ax=axes[0])
    axes[0].plot([0, 100], [0, 100], color="black", lw=1)
    axes[0].set(xlim=(-2, 102), ylim=(-2, 102), title="out-of-fold: predicted vs true", xlabel="true %",
                ylabel="predicted %")
    present = [c for c in SEVERITY_CLASSES if c in set(merged["severity"])]
    sns.boxplot(data=merged, x="severity", y="residual", order=present, ax=axes[1])
    axes[1].axhline(0, color="black", lw=1)
    axes[1].set(title="residual (predicted - true) by severity", xlabel="")
    axes[1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def model_comparison(table: pd.DataFrame, metric: str = "MAE") -> plt.Figure:
    """Bar chart of one metric per model (e.g. Table 3: with vs without pseudo-labels)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(table)), 4))
    sns.barplot(data=table, x="model", y=metric, ax=ax, color="steelblue")
    ax.bar_label(ax.containers[0], fmt="%.2f")
    if metric == "MAE" and "fold_MAE_std" in table:  # spread over folds, centred on the pooled OOF MAE
        ax.errorbar(range(len(table)), table["MAE"], yerr=table["fold_MAE_std"], fmt="none", ecolor="black", capsize=4)
    ax.set(title=f"out-of-fold {metric} per model", xlabel="")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def cross_validation(table: pd.DataFrame, per_fold: pd.DataFrame, title: str = "5-fold cross-validation") -> plt.Figure:
    """Pooled out-of-fold MAE per model (bars, from utils.sweep.cv_table) with each fold's MAE as a dot
    (per_fold: utils.sweep's cv_summary.csv), so the fold spread is visible next to the model differences."""
    order = table.sort_values("MAE")["model"].tolist()
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(order) + 1.2))
    sns.barplot(data=table, y="model", x="MAE", order=order, ax=ax, color="lightsteelblue")
    for y, mae in enumerate(table.set_index("model").loc[order, "MAE"]):
        ax.text(0.1, y, f"{mae:.2f}", va="center", ha="left", fontsize=9)  # inside the bar: the dots sit further right
    sns.stripplot(data=per_fold[per_fold["model"].isin(order)], y="model", x="MAE", order=order, hue="fold",
                  palette="deep", size=5, jitter=0.15, ax=ax)
    ax.legend(title="fold", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title_fontsize=8)
    ax.set(title=f"{title}: pooled OOF MAE (bars), each fold's MAE (dots)", xlabel="MAE (lower is better)", ylabel="")
    fig.tight_layout()
    return fig


def speed_accuracy_front(points: pd.DataFrame, front: pd.DataFrame, marked: str | None = None) -> plt.Figure:
    """Out-of-fold MAE against training seconds per fold, one dot per model (`points`: model, seconds, MAE), the
    front (`front`: the points no other beats on both, utils.front.pareto_front) as a line, `marked` as a star."""
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter(points["seconds"], points["MAE"], color="steelblue", zorder=3)
    for _, row in points.iterrows():
        ax.annotate(row["model"], (row["seconds"], row["MAE"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.step(front["seconds"], front["MAE"], where="post", color="darkorange", label="front", zorder=2)
    if marked is not None and marked in set(points["model"]):
        row = points[points["model"] == marked].iloc[0]
        ax.scatter([row["seconds"]], [row["MAE"]], marker="*", s=260, color="crimson", zorder=4,
                   label=f"{marked} (the baseline)")
    ax.set(xlabel="training seconds per fold", ylabel="out-of-fold MAE (5-fold CV; lower is better)",
           title="accuracy against training time on this CPU")
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    return fig


def coverage_by_class(tables: dict[str, pd.DataFrame], level: float) -> plt.Figure:
    """Coverage of the prediction intervals overall and per true severity class, one bar group per method
    (utils.intervals.coverage_table), the nominal level as a line; the mean width on each bar."""
    frame = pd.concat([t.assign(method=m) for m, t in tables.items()], ignore_index=True)
    fig, ax = plt.subplots(figsize=(10, 4))
    sns.barplot(data=frame, x="class", y="coverage", hue="method", ax=ax)
    for container, method in zip(ax.containers, tables):  # seaborn draws one container per hue, in order
        widths = tables[method]["mean_width"].to_numpy()
        ax.bar_label(container, labels=[f"±{w / 2:.0f}" for w in widths], fontsize=8)
    ax.axhline(level, color="black", lw=1, ls="--")
    ax.set(ylim=(0, 1.08), title=f"{level:.0%} intervals: coverage (bars) and half-width (labels), held-out folds",
           xlabel="true severity class")
    fig.tight_layout()
    return fig


def interval_widths(prediction: np.ndarray, low: np.ndarray, high: np.ndarray) -> plt.Figure:
    """Interval width against the predicted value: the error grows with severity, so does the width."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(prediction, high - low, s=8, alpha=0.5)
    ax.set(xlabel="predicted %", ylabel="interval width (points)", title="interval width by prediction")
    fig.tight_layout()
    return fig


def heatmap_grid(images: list[np.ndarray], maps: list[np.ndarray], titles: list[str], columns: int = 4) -> plt.Figure:
    """Slices with their saliency maps over them (utils.explain.heatmaps), a title each."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, heatmap, title in zip(axes.flat, images, maps, titles):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.imshow(heatmap, cmap="jet", alpha=0.35, vmin=0, vmax=max(float(heatmap.max()), 1e-6))
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def per_scan(table: pd.DataFrame) -> plt.Figure:
    """Each scan's mean prediction against its mean label (utils.explain.per_scan), sized by its slices."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    sns.scatterplot(data=table, x="mean_truth", y="mean_prediction", size="slices", hue="severity", ax=ax,
                    hue_order=[c for c in SEVERITY_CLASSES if c in set(table["severity"])])
    ax.plot([0, 100], [0, 100], color="black", lw=1)
    ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel="scan's mean label %", ylabel="scan's mean prediction %",
           title=f"per scan: MAE {table['abs_error'].mean():.2f} over {len(table)} scans")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
