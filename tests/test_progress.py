"""A client's progress over generations: a bar on a terminal, plain lines
otherwise, nothing when quiet."""

from __future__ import annotations

import io
import logging

from common.progress import generation_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(on_generation, end, generations: int) -> None:
    for generation in range(1, generations + 1):
        on_generation(generation, -1.0 / generation)
    end()


def test_a_terminal_gets_a_bar_that_goes_away_at_the_end():
    stream = Terminal()
    run(*generation_progress("alice [ROUND 2]", 40, stream=stream), 40)
    shown = stream.getvalue()
    assert "alice [ROUND 2]" in shown and "0/40" in shown and "gen/s" in shown
    # leave=False: the last thing written clears the line.
    assert shown.endswith("\r")


def test_without_a_terminal_a_plain_line_every_quarter(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="fedga.client"):
        run(*generation_progress("bob [ROUND 1]", 150, stream=stream), 150)
    assert stream.getvalue() == ""
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        f"bob [ROUND 1] generation {n}/150" for n in (38, 75, 112, 150)
    ]


def test_quiet_shows_nothing(caplog):
    stream = Terminal()
    on_generation, end = generation_progress("c [ROUND 1]", 10, True, stream)
    assert on_generation is None
    end()
    assert stream.getvalue() == "" and not caplog.records
