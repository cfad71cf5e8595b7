"""A client's progress over the generations of one round.

``generation_progress`` returns the ``on_generation`` callback that
``common.training.train_locally`` calls after every generation, and a
function that ends the display:

- attached to a terminal, a progress bar (tqdm) on standard error that
  disappears at the end of the round, when the round's result line follows;
- otherwise (a pipe, a log file, a test), a plain log line at every quarter
  of the generations;
- quiet, nothing.

tqdm is imported only for a terminal. One round's display belongs to the
client's one thread.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger("fedga.client")

# How many plain lines a round gets when there is no terminal.
PLAIN_LINES = 4

OnGeneration = Callable[[int, float], None]


def generation_progress(
    label: str,
    num_generations: int,
    quiet: bool = False,
    stream: TextIO | None = None,
) -> tuple[OnGeneration | None, Callable[[], None]]:
    """The per-generation callback for one round and the function that ends
    its display; ``label`` names the client and the round."""
    stream = stream if stream is not None else sys.stderr
    if quiet:
        return None, lambda: None
    if _is_terminal(stream):
        return _bar(label, num_generations, stream)
    return _plain_lines(label, num_generations), lambda: None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _bar(
    label: str, num_generations: int, stream: TextIO
) -> tuple[OnGeneration, Callable[[], None]]:
    from tqdm import tqdm

    # A terminal that reports no size (a bare pty says 0 x 0, and tqdm then
    # hides the bar) is taken as 100 x 24.
    size = shutil.get_terminal_size((100, 24))
    bar = tqdm(
        total=num_generations,
        desc=label,
        unit="gen",
        file=stream,
        leave=False,
        ncols=min(size.columns or 100, 100),
        nrows=size.lines or 24,
    )

    def on_generation(generation: int, best_fitness: float) -> None:
        bar.set_postfix_str(f"fitness {best_fitness:.4f}", refresh=False)
        bar.update(generation - bar.n)

    return on_generation, bar.close


def _plain_lines(label: str, num_generations: int) -> OnGeneration:
    # The generations after which a line is due: the end of every quarter.
    due = {
        max(1, round(k * num_generations / PLAIN_LINES))
        for k in range(1, PLAIN_LINES + 1)
    }

    def on_generation(generation: int, best_fitness: float) -> None:
        if generation in due:
            log.info(
                "%s generation %d/%d, best fitness %.4f",
                label,
                generation,
                num_generations,
                best_fitness,
            )

    return on_generation
