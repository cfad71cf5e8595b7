"""What the server tells a person about the rounds: one line per round and a
summary table at the end.

Plain text from the history records (``common.server.RoundRecord``), no I/O:
the server logs what these functions return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Rows of the summary table shown in full; a longer run shows its first and
# last rounds around a gap.
FULL_TABLE_ROWS = 20
EDGE_ROWS = 8


def round_line(record: Any, num_sessions: int) -> str:
    """One round for the console, after its ``[ROUND n]`` prefix: the
    accuracy and loss that the stopping rule watches first."""
    if record.accuracy is not None:
        measured = f"accuracy {record.accuracy:.3f} loss {record.loss:.4f}"
        if record.federated_accuracy is not None:
            measured += (
                f", federated {record.federated_accuracy:.3f} "
                f"loss {record.federated_loss:.4f}"
            )
    elif record.federated_accuracy is not None:
        measured = (
            f"accuracy {record.federated_accuracy:.3f} "
            f"loss {record.federated_loss:.4f} (federated)"
        )
    else:
        measured = "accuracy - loss - (nothing measured)"
    return (
        f"{measured}, replies {record.clients}/{num_sessions}, "
        f"failures {record.failures}, {record.seconds:.1f}s"
    )


def summary_table(records: Sequence[Any], final: Any = None) -> str:
    """Every round as a row of a text table (the middle of a long run left
    out), and which round's model was kept."""
    header = (
        "round",
        "replies",
        "failures",
        "accuracy",
        "loss",
        "fed acc",
        "fed loss",
        "seconds",
    )
    rows = [
        (
            str(r.round),
            str(r.clients),
            str(r.failures),
            _number(r.accuracy, 3),
            _number(r.loss, 4),
            _number(r.federated_accuracy, 3),
            _number(r.federated_loss, 4),
            f"{r.seconds:.1f}",
        )
        for r in records
    ]
    if len(rows) > FULL_TABLE_ROWS:
        gap = ("...",) + ("",) * (len(header) - 1)
        rows = rows[:EDGE_ROWS] + [gap] + rows[-EDGE_ROWS:]

    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(r.seconds for r in records)
    kept = f"the model of round {final.round}" if final is not None else "the last"
    lines.append(f"{len(records)} round(s) in {total:.1f}s; kept {kept}")
    if any(r.federated_accuracy is not None for r in records):
        lines.append(
            "fed acc, fed loss: the clients' evaluation of the model they "
            "received at the start of the round"
        )
    return "\n".join(lines)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
