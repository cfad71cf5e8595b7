#!/usr/bin/env python3
"""A federation on this machine from one data set: split, train, measure.

    python simulate.py --clients 5 --data data/iris.csv --partition label-skew

Splits the data set into held-out rows and one shard per client, starts the
server and the clients on loopback, trains, and prints the final model's
accuracy on the held-out rows. Options it does not know go to server.py
(e.g. --rounds 60 --generations 100); python simulate.py --help for its own.
"""

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path

from common.config import configure_logging
from common.datasets import PARTITIONS, DataError
from common.loopback import SERVER_DEFAULTS, SimulationConfig, run

log = logging.getLogger("fedga.simulate")


def parse_args(argv: list[str] | None = None) -> SimulationConfig:
    defaults = SimulationConfig(data=Path("data/iris.csv"))
    parser = argparse.ArgumentParser(
        prog="simulate.py",
        description=__doc__
        + "\nServer settings used unless given: "
        + " ".join(SERVER_DEFAULTS),
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=30
        ),
    )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    parser.add_argument(
        "--clients", type=int, default=defaults.clients, help="client processes (5)"
    )
    parser.add_argument(
        "--data", type=Path, default=defaults.data, help="CSV or .npz (data/iris.csv)"
    )
    parser.add_argument(
        "--partition",
        choices=PARTITIONS,
        default=defaults.partition,
        help="how rows are divided among clients (label-skew)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=defaults.alpha,
        help="label-skew: Dirichlet concentration, smaller is more skewed (0.5)",
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=defaults.holdout,
        help="fraction of rows held out for the final accuracy (0.2)",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=defaults.hidden,
        help="units of a hidden tanh layer; 0 for none (8)",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seeds everything (0)"
    )
    parser.add_argument("--label-column", help="label column (default: the last)")
    parser.add_argument(
        "--classes", help="class names in output order, when labels are names"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs") / f"simulate-{stamp}",
        help="folder for everything the run writes (runs/simulate-<time>)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show the clients' lines too"
    )
    args, server_args = parser.parse_known_args(argv)
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    if not 0 < args.holdout < 1:
        parser.error("--holdout must be between 0 and 1")
    return SimulationConfig(
        data=args.data,
        label_column=args.label_column,
        classes=tuple(args.classes.split(",")) if args.classes else None,
        clients=args.clients,
        partition=args.partition,
        alpha=args.alpha,
        holdout=args.holdout,
        seed=args.seed,
        hidden=args.hidden,
        out=args.out,
        verbose=args.verbose,
        server_args=tuple(server_args),
    )


def main() -> int:
    config = parse_args()
    configure_logging()
    try:
        result = run(config)
    except (DataError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    if result.accuracy is None:
        print(f"No model was saved; see {config.out}", file=sys.stderr)
        return result.exit_code or 1
    print(
        f"final accuracy on the {result.holdout_rows} held-out rows: "
        f"{result.accuracy:.3f} (loss {result.loss:.4f}); "
        f"{config.clients} clients, {config.partition}, {result.seconds:.0f}s; "
        f"results in {config.out}",
        flush=True,
    )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
