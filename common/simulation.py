"""In-process federation: the server's rounds without sockets, for studies.

``simulate`` runs the same local training (``common.training``) and the same
aggregation (``common.aggregation``) as the networked system, with the same
per-client seeds, but calls the clients in turn inside one process. It is
what the convergence study in ``bench/`` runs over many seeds; the networked
server and this loop must agree, and ``tests/test_end_to_end.py`` checks that
they do on a short run.

Run a quick study: ``python -m common.simulation --seeds 5``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.aggregation import AGGREGATORS, ServerOptimizer
from common.config import ServerConfig, derive_seed
from common.data import (
    CLIENT1_INPUTS,
    CLIENT1_LABELS,
    CLIENT2_INPUTS,
    CLIENT2_LABELS,
    XOR_INPUTS,
    XOR_LABELS,
)
from common.model import (
    build_xor_model,
    evaluate,
    vector_to_weights,
    weight_shapes,
    weights_to_vector,
)
from common.training import PopulationScorer, train_locally


@dataclass(frozen=True)
class SimulatedClient:
    client_id: str
    inputs: np.ndarray
    labels: np.ndarray


XOR_CLIENTS = (
    SimulatedClient("client1", CLIENT1_INPUTS, CLIENT1_LABELS),
    SimulatedClient("client2", CLIENT2_INPUTS, CLIENT2_LABELS),
)
CENTRALIZED = (SimulatedClient("centralized", XOR_INPUTS, XOR_LABELS),)


@dataclass
class SimulationResult:
    seed: int
    # Rounds run; equal to the rounds needed when ``reached`` is true.
    rounds: int
    reached: bool
    accuracy: float
    loss: float
    seconds: float


def simulate(
    config: ServerConfig,
    clients: Sequence[SimulatedClient] = XOR_CLIENTS,
) -> SimulationResult:
    """Train the XOR model by federated GA in one process until the target
    accuracy or the round limit, exactly as the server would."""
    started = time.perf_counter()
    model = build_xor_model(config.seed)
    shapes = weight_shapes(model)
    global_vector = weights_to_vector(model.get_weights())
    scorers = {
        c.client_id: PopulationScorer(model, c.inputs, c.labels) for c in clients
    }
    aggregate = AGGREGATORS[config.aggregation]
    optimizer = ServerOptimizer(config.server_learning_rate, config.server_momentum)

    loss, acc = float("nan"), 0.0
    for round_number in range(1, config.rounds + 1):
        vectors, counts = [], []
        for client in sorted(clients, key=lambda c: c.client_id):
            settings = dataclasses.replace(
                config.ga, seed=derive_seed(config.seed, client.client_id, round_number)
            )
            weights = vector_to_weights(global_vector, shapes)
            result = train_locally(scorers[client.client_id], weights, settings)
            vectors.append(result.best_vector)
            counts.append(len(client.inputs))
        global_vector = optimizer.step(global_vector, aggregate(vectors, counts))

        model.set_weights(vector_to_weights(global_vector, shapes))
        loss, acc = evaluate(model, XOR_INPUTS, XOR_LABELS)
        if acc >= config.target_accuracy:
            return SimulationResult(
                config.seed,
                round_number,
                True,
                acc,
                loss,
                time.perf_counter() - started,
            )
    return SimulationResult(
        config.seed, config.rounds, False, acc, loss, time.perf_counter() - started
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the federation in one process over several seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--centralized", action="store_true", help="one client, 4 rows")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a GA or server setting, e.g. mutation_range=0.3",
    )
    args = parser.parse_args(argv)

    base = ServerConfig(rounds=args.rounds)
    ga_overrides, server_overrides = {}, {}
    for item in args.set:
        name, _, value = item.partition("=")
        target = ga_overrides if hasattr(base.ga, name) else server_overrides
        target[name] = type(getattr(base.ga, name, getattr(base, name, 0.0)))(value)
    base = dataclasses.replace(
        base, ga=dataclasses.replace(base.ga, **ga_overrides), **server_overrides
    )
    clients = CENTRALIZED if args.centralized else XOR_CLIENTS
    rounds = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        result = simulate(dataclasses.replace(base, seed=seed), clients)
        rounds.append(result.rounds if result.reached else None)
        print(
            f"seed {seed}: {'reached' if result.reached else 'missed'} after "
            f"{result.rounds} rounds, accuracy {result.accuracy:.2f}, "
            f"loss {result.loss:.4f}, {result.seconds:.1f}s",
            flush=True,
        )
    reached = [r for r in rounds if r is not None]
    print(
        f"converged {len(reached)}/{len(rounds)}; rounds median "
        f"{np.median(reached) if reached else float('nan')}, worst "
        f"{max(reached) if reached else None}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
