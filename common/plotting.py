"""history.png: how a federation went, round by round, in one picture.

Three panels share the x axis, the rounds:

1. accuracy of the global model: the server's evaluation (on its eval data)
   and the clients' federated evaluation, with the target as a dotted line;
2. their loss;
3. each client's local fitness: the fitness of the best solution its GA
   found in the round (the negated cross-entropy on its own examples, so
   higher is better).

Every line is labelled at its right end, so no legend is needed. The rows
are the ones in history.csv and clients.csv (numbers, or the strings read
back from the files; an empty cell is a missing value).

matplotlib is imported when a plot is drawn, with the Agg backend (no
screen needed). Redraw a finished run: ``python -m common.plotting runs/X``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Row = Mapping[str, Any]

# Colours: the server's evaluation, the federated one, the target.
SERVER_COLOUR = "#1f5fa8"
FEDERATED_COLOUR = "#d9730d"
TARGET_COLOUR = "#444444"


def plot_history(
    path: Path,
    history: Sequence[Row],
    clients: Sequence[Row] = (),
    target_accuracy: float | None = None,
    eval_name: str | None = None,
    title: str = "",
) -> Any:
    """Draw the rounds into ``path`` (PNG), atomically; return the figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [int(_value(r["round"])) for r in history]
    figure, (accuracy_axes, loss_axes, fitness_axes) = plt.subplots(
        3, 1, sharex=True, figsize=(8, 9), constrained_layout=True
    )
    figure.suptitle(title or "Federated GA training")
    server_label = "server"
    labels: dict[Any, list[tuple[float, float, str, Any]]] = {}

    # Accuracy: the server's, the federated one, the target.
    _line(
        labels, accuracy_axes, rounds, history, "accuracy", SERVER_COLOUR, server_label
    )
    _line(
        labels,
        accuracy_axes,
        rounds,
        history,
        "federated_accuracy",
        FEDERATED_COLOUR,
        "federated",
        dashed=True,
    )
    if target_accuracy is not None:
        accuracy_axes.axhline(target_accuracy, color=TARGET_COLOUR, linestyle=":")
        accuracy_axes.annotate(
            f"target {target_accuracy:g}",
            (0, target_accuracy),
            xycoords=("axes fraction", "data"),
            xytext=(4, -11),
            textcoords="offset points",
            color=TARGET_COLOUR,
            fontsize=9,
        )
    accuracy_axes.set_ylim(-0.02, 1.05)
    accuracy_axes.set_ylabel("accuracy")
    server_part = f"server on {eval_name}, " if eval_name else ""
    accuracy_axes.set_title(
        f"global model: {server_part}federated on the clients' own data "
        "(the model they received)",
        fontsize=9,
        loc="left",
    )

    # Loss: the same two measurements.
    _line(labels, loss_axes, rounds, history, "loss", SERVER_COLOUR, server_label)
    _line(
        labels,
        loss_axes,
        rounds,
        history,
        "federated_loss",
        FEDERATED_COLOUR,
        "federated",
        dashed=True,
    )
    loss_axes.set_ylabel("loss (cross-entropy)")

    # Each client's local fitness.
    by_client: dict[str, list[tuple[int, float]]] = {}
    for row in clients:
        by_client.setdefault(str(row["client_id"]), []).append(
            (int(_value(row["round"])), _value(row.get("fitness")))
        )
    palette = plt.get_cmap("tab10")
    for index, (client_id, points) in enumerate(sorted(by_client.items())):
        xs, ys = zip(*sorted(points), strict=True)
        colour = palette(index % 10)
        fitness_axes.plot(xs, ys, color=colour, linewidth=1.2, marker=".")
        _remember_end(labels, fitness_axes, xs, ys, client_id, colour)
    fitness_axes.set_ylabel("local fitness\n(best solution)")
    fitness_axes.ticklabel_format(axis="y", useOffset=False, style="plain")
    fitness = [_value(row.get("fitness")) for row in clients]
    fitness = [f for f in fitness if not math.isnan(f)]
    if fitness and max(fitness) - min(fitness) < 1e-3:
        # A flat line (every client solved its examples): no hair-splitting.
        fitness_axes.set_ylim(min(fitness) - 0.05, max(fitness) + 0.05)
    fitness_axes.set_xlabel("round")

    # Rounds are whole numbers; room on the right for the line labels.
    for axes in (accuracy_axes, loss_axes, fitness_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, alpha=0.3)
        axes.margins(x=0.02)
    if rounds:
        span = max(rounds) - min(rounds)
        fitness_axes.set_xlim(min(rounds) - 0.3, max(rounds) + 0.3 + 0.18 * span + 1)
    for axes, entries in labels.items():
        _place_labels(axes, entries)

    temporary = path.with_name(path.name + ".tmp")
    figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
    return figure


def _line(
    labels: dict[Any, list],
    axes: Any,
    rounds: list[int],
    history: Sequence[Row],
    key: str,
    colour: str,
    label: str,
    dashed: bool = False,
) -> None:
    """One measurement over the rounds; nothing when it was never measured."""
    values = [_value(r.get(key)) for r in history]
    if all(math.isnan(v) for v in values):
        return
    axes.plot(
        rounds,
        values,
        color=colour,
        linestyle="--" if dashed else "-",
        linewidth=1.8,
        marker="o",
        markersize=3,
    )
    _remember_end(labels, axes, rounds, values, label, colour)


def _remember_end(
    labels: dict[Any, list],
    axes: Any,
    xs: Sequence[int],
    ys: Sequence[float],
    text: str,
    colour: Any,
) -> None:
    """Note a label for the line's last measured point, to place later."""
    for x, y in zip(reversed(xs), reversed(ys), strict=True):
        if not math.isnan(y):
            labels.setdefault(axes, []).append((x, y, text, colour))
            return


def _place_labels(axes: Any, entries: list[tuple[float, float, str, Any]]) -> None:
    """Write each label right of its line's end, moved apart vertically so
    that labels of lines ending close together do not overlap."""
    axes.autoscale_view()
    low, high = axes.get_ylim()
    span = (high - low) or 1.0
    gap = 0.07
    entries = sorted(entries, key=lambda e: e[1])

    # Heights in axes fractions, pushed up apart, then down into the panel.
    heights = [min(max((y - low) / span, 0.0), 1.0) for _, y, _, _ in entries]
    for i in range(1, len(heights)):
        heights[i] = max(heights[i], heights[i - 1] + gap)
    if heights and heights[-1] > 1.0:
        heights[-1] = 1.0
        for i in range(len(heights) - 2, -1, -1):
            heights[i] = min(heights[i], heights[i + 1] - gap)

    for (x, _, text, colour), height in zip(entries, heights, strict=True):
        axes.annotate(
            text,
            (x, height),
            xycoords=("data", "axes fraction"),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            color=colour,
            fontsize=9,
            annotation_clip=False,
        )


def _value(cell: Any) -> float:
    """A number from a record or a CSV cell; NaN for a missing one."""
    if cell is None or cell == "":
        return math.nan
    return float(cell)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Redraw history.png from the history.csv and clients.csv "
        "of a finished run."
    )
    parser.add_argument("out", type=Path, help="the run's folder")
    parser.add_argument("--target-accuracy", type=float, default=None)
    args = parser.parse_args(argv)
    rows = {}
    for name in ("history", "clients"):
        with open(args.out / f"{name}.csv", newline="") as handle:
            rows[name] = list(csv.DictReader(handle))
    plot_history(
        args.out / "history.png",
        rows["history"],
        rows["clients"],
        target_accuracy=args.target_accuracy,
        title=str(args.out),
    )
    print(args.out / "history.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
