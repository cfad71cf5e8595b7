"""Settings of the server and the clients, their command lines, and seeds.

Cheap to import (no TensorFlow): the console scripts parse their arguments
here, so ``--help`` and a bad argument answer at once, before the seconds
that importing TensorFlow costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
# A frame larger than this is refused before its payload is read. The XOR
# model's messages are about 2 KB; 64 MiB leaves room for real models.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class GAConfig:
    """The GA settings the server sends to every client each round.

    Lives here, not in ``common.training``, so that parsing arguments needs
    no TensorFlow; the per-client ``seed`` is filled in by the server for
    each round.
    """

    # Generations each client runs per round.
    num_generations: int = 150
    # Solutions in the population, the global weights among them.
    num_solutions: int = 10
    # Solutions chosen as parents each generation.
    num_parents_mating: int = 4
    # Best solutions carried unchanged into the next generation.
    keep_elitism: int = 1
    # Percent of genes that mutation changes in each offspring.
    mutation_percent_genes: float = 10.0
    # Mutation adds a value drawn uniformly from [-mutation_range, +mutation_range].
    mutation_range: float = 1.0
    # The first population spreads up to this far around the global weights.
    init_range: float = 1.0
    # A client's GA stops once its loss on its own data is this low (0: never).
    # Going further saturates its rows, and the average of saturated models
    # lands badly; stopping early also makes a round several times cheaper.
    target_loss: float = 0.1
    # Seed of one client's GA in one round; the server sets it.
    seed: int = 0


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to run a federation."""

    # Address to listen on; 127.0.0.1 keeps the server private to this machine.
    host: str = DEFAULT_HOST
    # Port to listen on; 0 picks a free one (logged as "listening on").
    port: int = DEFAULT_PORT
    # Clients that must have said echo before a round starts.
    min_clients: int = 2
    # Rounds at most; the run stops earlier when the target is reached.
    rounds: int = 100
    # Accuracy of the global model that ends the run (see eval_data).
    target_accuracy: float = 1.0
    # Seed of the initial weights and of every client's GA seeds.
    seed: int = 0
    # Folder for model.keras and history.csv; None makes one under runs/.
    out: Path | None = None
    # How the replies are combined: fedavg, median or trimmed-mean.
    aggregation: str = "fedavg"
    # Step on the averaged update (1.0 lands on the average, plain FedAvg).
    # 2.0 suits the two XOR clients: each one's change lands in full.
    server_learning_rate: float = 2.0
    # Momentum on the averaged update (0: none); 0.3 builds up the part of the
    # update that recurs round after round.
    server_momentum: float = 0.3
    # Seconds a round may take before missing replies count as failures.
    round_timeout: float = 300.0
    # Seconds a peer may take to finish a frame it has started, or to greet.
    io_timeout: float = 30.0
    # Largest frame accepted, in bytes.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Open connections at most (each has a thread); more are refused at once.
    max_connections: int = 1000
    ga: GAConfig = field(default_factory=GAConfig)
    # File holding the secret every client must prove it knows; None: no check.
    secret_file: Path | None = None
    # TLS certificate chain and private key; None: plain TCP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Replies a round needs to count; with fewer the global model stays as it
    # was and the round is tried again once enough clients are connected.
    # The command line defaults it to min_clients.
    min_fit_clients: int = 2
    # Continue from the checkpoint in ``out`` instead of starting at round 1.
    resume: bool = False
    # A saved Keras model (.keras) to federate, architecture and initial
    # weights; None federates the built-in XOR model.
    model: Path | None = None
    # Held-out examples the server evaluates the global model on. None: the
    # truth table for the built-in XOR model, otherwise the clients' own
    # (federated) evaluation of the model they receive.
    eval_data: Path | None = None
    # Label column of eval_data (a name or an index; None: the last).
    label_column: str | None = None
    # Class names in output order, when eval_data labels are names.
    classes: tuple[str, ...] | None = None
    # Stop after this many rounds without improvement; None never does.
    patience: int | None = None


@dataclass(frozen=True)
class ClientConfig:
    """Everything a client needs to join a federation."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # Stable name of this client; the server derives its GA seeds from it.
    client_id: str = "client"
    # Seconds to wait for a frame to finish once it has started.
    io_timeout: float = 30.0
    # Seconds to wait for the server's next message (it may be waiting for
    # other clients to finish their round).
    idle_timeout: float = 3600.0
    # Connection attempts before giving up, and the first pause between them;
    # the pause doubles, so the defaults give up after about 31 seconds.
    retries: int = 6
    retry_delay: float = 1.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Only warnings and errors: no progress, no line per round.
    quiet: bool = False
    # File holding the secret shared with the server; None: no handshake.
    secret_file: Path | None = None
    # CA certificate that the server's TLS certificate must verify against;
    # None: plain TCP.
    tls_ca: Path | None = None
    # The client's own examples: a CSV file or an .npz archive.
    data: Path | None = None
    # Label column of a CSV file (a name or an index; None: the last).
    label_column: str | None = None
    # Class names in output order, when the labels are names.
    classes: tuple[str, ...] | None = None


def derive_seed(seed: int, client_id: str, round_number: int) -> int:
    """The GA seed of one client in one round: a hash of the server's seed,
    the client's id and the round, so it does not depend on who connected
    first."""
    text = f"{seed}/{client_id}/{round_number}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "big")


# Command lines ---------------------------------------------------------------


class _HelpFormatter(
    argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    pass


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a readable file")
    return path


def _class_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"must be two or more distinct names separated by commas, got {text!r}"
        )
    return names


def _add_label_arguments(parser: argparse.ArgumentParser, data_option: str) -> None:
    parser.add_argument(
        "--label-column",
        default=None,
        help=f"label column of a CSV {data_option}, by name or index "
        "(default: the last)",
    )
    parser.add_argument(
        "--classes",
        type=_class_names,
        default=None,
        help="class names in the model's output order, e.g. cat,dog, when the "
        "labels are names (default: labels are class numbers 0, 1, ...)",
    )


def _add_connection_arguments(parser: argparse.ArgumentParser, port_help: str) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help="server address")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=port_help)
    parser.add_argument(
        "--io-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds a peer may take to finish a message it has started",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest message accepted, in bytes",
    )
    parser.add_argument(
        "--secret-file",
        type=_readable_file,
        default=None,
        help="file with a secret shared by the server and its clients (at least "
        "16 bytes); every connection must prove it knows it",
    )


def server_parser() -> argparse.ArgumentParser:
    ga = GAConfig()
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="server.py",
        formatter_class=_HelpFormatter,
        description=(
            "Federated GA training server. Sends a Keras model (the built-in XOR\n"
            "model, or --model) to every client, averages the weights they evolve,\n"
            "and repeats until the model reaches the target accuracy: on\n"
            "--eval-data (the XOR truth table for the XOR model), or else on the\n"
            "clients' own data as they report it (federated evaluation).\n\n"
            "Exit status: 0 target reached, 3 stopped before it (rounds used up,\n"
            "--patience), 2 bad arguments, model or eval data."
        ),
    )
    _add_connection_arguments(parser, "port to listen on; 0 picks a free one")
    parser.add_argument(
        "--min-clients",
        type=_positive_int,
        default=defaults.min_clients,
        help="clients that must be connected before a round starts",
    )
    parser.add_argument(
        "--rounds", type=_positive_int, default=defaults.rounds, help="rounds at most"
    )
    parser.add_argument(
        "--target-accuracy",
        type=_fraction,
        default=defaults.target_accuracy,
        help="stop when the global model reaches this accuracy",
    )
    parser.add_argument(
        "--generations",
        type=_positive_int,
        default=ga.num_generations,
        help="GA generations per client per round",
    )
    parser.add_argument(
        "--solutions",
        type=_positive_int,
        default=ga.num_solutions,
        help="GA population size",
    )
    parser.add_argument(
        "--parents-mating",
        type=_positive_int,
        default=ga.num_parents_mating,
        help="GA parents chosen each generation",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the initial weights and every client's GA",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=argparse.SUPPRESS,
        help="folder for model.keras and history.csv (default: a new runs/<time>)",
    )
    parser.add_argument(
        "--aggregation",
        choices=["fedavg", "median", "trimmed-mean"],
        default=defaults.aggregation,
        help="how the clients' weights are combined",
    )
    parser.add_argument(
        "--server-learning-rate",
        type=_positive_float,
        default=defaults.server_learning_rate,
        help="step size on the averaged update (1 is plain FedAvg)",
    )
    parser.add_argument(
        "--server-momentum",
        type=_fraction,
        default=defaults.server_momentum,
        help="momentum on the averaged update (0 is plain FedAvg)",
    )
    parser.add_argument(
        "--round-timeout",
        type=_positive_float,
        default=defaults.round_timeout,
        help="seconds a round may take; late clients count as failures",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=defaults.max_connections,
        help="open connections at most; more are refused with an error",
    )
    parser.add_argument(
        "--tls-cert",
        type=_readable_file,
        default=None,
        help="TLS certificate chain (PEM); with --tls-key, clients must use TLS",
    )
    parser.add_argument(
        "--tls-key", type=_readable_file, default=None, help="TLS private key (PEM)"
    )
    parser.add_argument(
        "--min-fit-clients",
        type=_positive_int,
        default=argparse.SUPPRESS,
        help="replies a round needs to count; with fewer it is tried again "
        "(default: --min-clients)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out (which is then required)",
    )
    parser.add_argument(
        "--mutation-range",
        type=_positive_float,
        default=ga.mutation_range,
        help="mutation adds a value drawn from [-range, +range] to a gene",
    )
    parser.add_argument(
        "--init-range",
        type=_positive_float,
        default=ga.init_range,
        help="how far the first population spreads around the global weights",
    )
    parser.add_argument(
        "--target-loss",
        type=_non_negative_float,
        default=ga.target_loss,
        help="a client's GA stops once its loss on its own data is this low "
        "(0: never; run every generation)",
    )
    parser.add_argument(
        "--model",
        type=_readable_file,
        default=None,
        help="a saved Keras model (.keras) to federate instead of the XOR model",
    )
    parser.add_argument(
        "--eval-data",
        type=_readable_file,
        default=None,
        help="held-out CSV or .npz the server evaluates the global model on "
        "(default: the XOR truth table for the XOR model, else the clients' "
        "federated evaluation)",
    )
    _add_label_arguments(parser, "--eval-data")
    parser.add_argument(
        "--patience",
        type=_positive_int,
        default=None,
        help="stop after this many rounds without improvement (default: never)",
    )
    return parser


def _check_secret(parser: argparse.ArgumentParser, path: Path | None) -> None:
    """Exit 2 now, rather than at the first connection, for an unusable secret."""
    from common.security import SecretError, load_secret

    if path is not None:
        try:
            load_secret(path)
        except SecretError as exc:
            parser.error(str(exc))


def parse_server_args(argv: list[str] | None = None) -> ServerConfig:
    """Parse the server's command line; exit 2 with a message when it is wrong."""
    parser = server_parser()
    args = parser.parse_args(argv)
    if args.parents_mating > args.solutions:
        parser.error(
            f"--parents-mating ({args.parents_mating}) cannot exceed "
            f"--solutions ({args.solutions})"
        )
    _check_secret(parser, args.secret_file)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    out = getattr(args, "out", None)
    if out is not None and out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a folder")
    if args.resume and out is None:
        parser.error("--resume needs the --out folder of the run to continue")
    ga = dataclasses.replace(
        GAConfig(),
        num_generations=args.generations,
        num_solutions=args.solutions,
        num_parents_mating=args.parents_mating,
        mutation_range=args.mutation_range,
        init_range=args.init_range,
        target_loss=args.target_loss,
    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        min_clients=args.min_clients,
        rounds=args.rounds,
        target_accuracy=args.target_accuracy,
        seed=args.seed,
        out=out,
        aggregation=args.aggregation,
        server_learning_rate=args.server_learning_rate,
        server_momentum=args.server_momentum,
        round_timeout=args.round_timeout,
        max_connections=args.max_connections,
        io_timeout=args.io_timeout,
        max_message_bytes=args.max_message_bytes,
        ga=ga,
        secret_file=args.secret_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        min_fit_clients=getattr(args, "min_fit_clients", args.min_clients),
        resume=args.resume,
        model=args.model,
        eval_data=args.eval_data,
        label_column=args.label_column,
        classes=args.classes,
        patience=args.patience,
    )


def client_parser(
    prog: str, description: str, with_data: bool = False
) -> argparse.ArgumentParser:
    defaults = ClientConfig()
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=_HelpFormatter, description=description
    )
    _add_connection_arguments(parser, "server port")
    parser.add_argument(
        "--client-id",
        # client.py runs once per data file: name it after the file, so two
        # clients on one server do not share a name (and replace each other).
        default=argparse.SUPPRESS if with_data else Path(prog).stem,
        help="stable name of this client; the server seeds its GA from it"
        + (" (default: the --data file's name without suffix)" if with_data else ""),
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=defaults.retries,
        help="connection attempts in a row before giving up, at start or after "
        "losing the server",
    )
    parser.add_argument(
        "--retry-delay",
        type=_positive_float,
        default=defaults.retry_delay,
        help="seconds before the second attempt; doubles after each failure",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print only warnings and errors: no progress, no line per round",
    )
    parser.add_argument(
        "--tls-ca",
        type=_readable_file,
        default=None,
        help="CA certificate (PEM): connect with TLS and refuse a server whose "
        "certificate does not verify against it",
    )
    if with_data:
        parser.add_argument(
            "--data",
            type=Path,
            required=True,
            help="this client's examples: a CSV file with a header, or an .npz "
            "archive with arrays x and y",
        )
        _add_label_arguments(parser, "--data")
    return parser


def parse_client_args(
    prog: str,
    description: str,
    argv: list[str] | None = None,
    with_data: bool = False,
) -> ClientConfig:
    """Parse a client's command line; ``with_data`` adds ``--data`` and its
    label options (client.py), the XOR scripts hold their rows in code."""
    parser = client_parser(prog, description, with_data)
    args = parser.parse_args(argv)
    _check_secret(parser, args.secret_file)
    return ClientConfig(
        host=args.host,
        port=args.port,
        client_id=getattr(args, "client_id", None) or Path(args.data).stem,
        io_timeout=args.io_timeout,
        retries=args.retries,
        retry_delay=args.retry_delay,
        max_message_bytes=args.max_message_bytes,
        quiet=args.quiet,
        secret_file=args.secret_file,
        tls_ca=args.tls_ca,
        data=getattr(args, "data", None),
        label_column=getattr(args, "label_column", None),
        classes=getattr(args, "classes", None),
    )


def as_dict(config: Any) -> dict[str, Any]:
    """A config as plain values, for logging and checkpoints."""
    return {
        k: (str(v) if isinstance(v, os.PathLike) else v)
        for k, v in dataclasses.asdict(config).items()
    }


def configure_logging(quiet: bool = False) -> None:
    """Short, timestamped lines on standard error for the console scripts."""
    import logging

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
