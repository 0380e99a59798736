"""The workdir's PNGs: `loss.png`, the training curve (and the evaluations during training),
and `results.png`, a grid of queries and their nearest hits marked right or wrong.

Drawn with matplotlib's object API onto an Agg canvas: no pyplot, so nothing changes the
backend or the figures of a program that imports the package.
"""

import dataclasses

import numpy as np

from jaxretrieval.fileio import atomic_file

# Colours of a hit of the query's class and of another class (green, red).
SAME_COLOUR, OTHER_COLOUR = "#1a9641", "#d7191c"
DPI = 100
# Each row of the result grid is this many inches high, each image column this wide.
ROW_INCHES, COLUMN_INCHES = 1.6, 1.3
# The metrics the loss plot draws from evaluation records.
PLOTTED_METRICS = ("recall@1", "map@r")


@dataclasses.dataclass(frozen=True)
class Hit:
    image: np.ndarray  # uint8 [size, size, channels]
    key: str
    score: float
    same_class: bool


@dataclasses.dataclass(frozen=True)
class ResultRow:
    query_image: np.ndarray  # uint8 [size, size, channels]
    query_key: str
    hits: list  # Hit, best first


def _figure(width_inches: float, height_inches: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_inches, height_inches), dpi=DPI)


def _save(figure, path: str) -> None:
    with atomic_file(path, "wb") as f:
        figure.savefig(f, format="png", dpi=DPI)


def plot_training(records, path: str) -> bool:
    """Draws the training loss of metrics.jsonl's records against the step, and under it
    the evaluations' recall@1 and MAP@R when there were evaluations during training (two or
    more evaluation records); writes the PNG at `path`. False, and nothing written, when no
    record has a loss."""
    train = [r for r in records
             if r.get("kind", "train") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return False
    with_evals = len(evals) >= 2
    figure = _figure(7.0, 6.0 if with_evals else 3.6)
    axes = figure.subplots(2 if with_evals else 1, 1, sharex=True, squeeze=False)[:, 0]
    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]
    axes[0].plot(steps, losses, marker="." if len(steps) < 50 else None, color="#2b83ba")
    if min(losses) > 0 and max(losses) > 10 * min(losses):
        axes[0].set_yscale("log")  # a loss that falls by orders of magnitude
    axes[0].set_ylabel("training loss")
    axes[0].grid(alpha=0.3)
    if with_evals:
        for name in PLOTTED_METRICS:
            points = [(r["step"], r[name]) for r in evals if r.get(name) is not None]
            if points:
                axes[1].plot(*zip(*points), marker="o", label=name)
        axes[1].set_ylim(0.0, 1.0)
        axes[1].set_ylabel("evaluation")
        axes[1].legend(loc="best")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    _save(figure, path)
    return True


def _short(key: str, width: int = 18) -> str:
    return key if len(key) <= width else "..." + key[-(width - 3):]


def _show(ax, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_results(rows, path: str) -> None:
    """Draws one row per ResultRow: the query image, then its hits, each titled with its key
    and score and framed green (the query's class) or red (another class); writes the PNG
    at `path`. The image is ROW_INCHES * DPI pixels high per row."""
    num_hits = max((len(row.hits) for row in rows), default=0)
    columns = 1 + num_hits
    height = ROW_INCHES * max(len(rows), 1)
    figure = _figure(COLUMN_INCHES * columns, height)
    grid = figure.subplots(max(len(rows), 1), columns, squeeze=False)
    for ax in grid.ravel():
        ax.axis("off")
    for axes, row in zip(grid, rows):
        axes[0].axis("on")
        _show(axes[0], row.query_image)
        axes[0].set_title(f"query\n{_short(row.query_key)}", fontsize=7)
        for ax in axes[0].spines.values():
            ax.set_linewidth(3)
        for ax, hit in zip(axes[1:], row.hits):
            colour = SAME_COLOUR if hit.same_class else OTHER_COLOUR
            ax.axis("on")
            _show(ax, hit.image)
            ax.set_title(f"{_short(hit.key)}\n{hit.score:.3f}", fontsize=7, color=colour)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
    # Room above each row for its two-line titles.
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.05 / height,
                           top=1 - 0.35 / height, wspace=0.15, hspace=0.5)
    _save(figure, path)
