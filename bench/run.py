"""Every benchmark in one go: ``make bench`` (or ``python -m bench.run``).

Measures, on this machine, with wall-clock time:

1. one client round (XOR, 10 solutions x 150 generations): the project's
   batched fitness against the per-solution ``pygad.kerasga.predict`` baseline;
2. population scoring for a 3-layer dense model, population 50: one batched
   call against 50 per-solution predictions;
3. rounds to accuracy 1.0 over 20 seeds with the default settings (in-process
   simulation, same code as the networked system), and the centralized limit
   (one client holding all four rows);
4. ``make demo`` wall time once installed (``demo.py`` as a process);
5. the server's cost per round with 10, 100 and 500 concurrent protocol
   clients that reply at once, and its memory per connected client.

Prints a table, writes ``bench/results.json`` and rewrites ``BENCHMARKS.md``.
``--quick`` runs fewer repetitions and seeds, for a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# isort: off
# quiet_tf must load TensorFlow before pygad.kerasga does.
from common.quiet_tf import keras  # noqa: E402
import pygad  # noqa: E402
import pygad.kerasga  # noqa: E402

# isort: on

from bench.server_load import measure_server_rounds  # noqa: E402
from common.config import GAConfig, ServerConfig  # noqa: E402
from common.data import CLIENT1_INPUTS, CLIENT1_LABELS  # noqa: E402
from common.model import build_xor_model, cross_entropy  # noqa: E402
from common.simulation import CENTRALIZED, XOR_CLIENTS, simulate  # noqa: E402
from common.training import PopulationScorer, train_locally  # noqa: E402

RESULTS = ROOT / "bench" / "results.json"
REPORT = ROOT / "BENCHMARKS.md"


def timed(function, repeat: int) -> float:
    """Median wall-clock seconds of ``repeat`` calls."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


# 1. Client round -------------------------------------------------------------


def per_solution_round(model: keras.Model, settings: GAConfig) -> None:
    """The baseline: the same GA, fitness by one kerasga.predict per solution."""
    np.random.seed(settings.seed)
    population = pygad.kerasga.KerasGA(model, settings.num_solutions).population_weights

    def fitness(ga, solution, index):
        probs = pygad.kerasga.predict(model, solution, CLIENT1_INPUTS)
        return -cross_entropy(np.asarray(probs, dtype=np.float64), CLIENT1_LABELS)

    pygad.GA(
        num_generations=settings.num_generations,
        num_parents_mating=settings.num_parents_mating,
        fitness_func=fitness,
        initial_population=population,
        keep_elitism=settings.keep_elitism,
        mutation_percent_genes=settings.mutation_percent_genes,
        random_seed=settings.seed,
        suppress_warnings=True,
    ).run()


def bench_client_round(repeat: int) -> dict:
    # Every generation runs in both (no early stop), so that the two do the
    # same work; the default round, which stops at target_loss, is timed too.
    settings = dataclasses.replace(
        GAConfig(), num_generations=150, num_solutions=10, seed=1, target_loss=0.0
    )
    model = build_xor_model(seed=0)
    weights = model.get_weights()
    scorer = PopulationScorer(model, CLIENT1_INPUTS, CLIENT1_LABELS)
    train_locally(scorer, weights, settings)  # trace the tf.function once
    batched = timed(lambda: train_locally(scorer, weights, settings), repeat)
    default = dataclasses.replace(GAConfig(), seed=1)
    early = timed(lambda: train_locally(scorer, weights, default), repeat)
    baseline = timed(lambda: per_solution_round(model, settings), 1)
    return {
        "batched_s": batched,
        "per_solution_s": baseline,
        "speedup": baseline / batched,
        "default_round_s": early,
    }


# 2. Population scoring -------------------------------------------------------


def bench_population_scoring(repeat: int) -> dict:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(8,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(64, 8)).astype(np.float32)
    labels = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 64)]
    scorer = PopulationScorer(model, inputs, labels)
    population = rng.normal(scale=0.3, size=(50, scorer.num_genes))
    scorer.predict(population)  # trace once

    batched = timed(lambda: scorer.predict(population), repeat * 10)
    baseline = timed(
        lambda: [pygad.kerasga.predict(model, s, inputs) for s in population], repeat
    )
    return {
        "genes": scorer.num_genes,
        "batched_s": batched,
        "per_solution_s": baseline,
        "speedup": baseline / batched,
    }


# 3. Convergence --------------------------------------------------------------


def bench_convergence(seeds: int, rounds: int) -> dict:
    def study(clients) -> list[int | None]:
        needed = []
        for seed in range(seeds):
            result = simulate(ServerConfig(seed=seed, rounds=rounds), clients)
            needed.append(result.rounds if result.reached else None)
        return needed

    started = time.perf_counter()
    federated = study(XOR_CLIENTS)
    centralized = study(CENTRALIZED)
    reached = [r for r in federated if r is not None]
    central = [r for r in centralized if r is not None]
    return {
        "seeds": seeds,
        "round_cap": rounds,
        "rounds_per_seed": federated,
        "converged_fraction": len(reached) / seeds,
        "median_rounds": statistics.median(reached) if reached else None,
        "worst_rounds": max(reached) if len(reached) == seeds else None,
        "centralized_rounds": statistics.median(central) if central else None,
        "centralized_worst": max(central) if central else None,
        "seconds": time.perf_counter() - started,
    }


# 4. Demo ---------------------------------------------------------------------


def bench_demo(out: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return time.perf_counter() - started


# Report ----------------------------------------------------------------------


def machine() -> str:
    import tensorflow as tf

    cores = os.cpu_count()
    return (
        f"{platform.machine()}, {cores} cores, {platform.system()}; Python "
        f"{platform.python_version()}, TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}, PyGAD {pygad.__version__}, numpy {np.__version__}"
    )


def table(results: dict) -> str:
    c, p, v = (
        results["client_round"],
        results["population_scoring"],
        results["convergence"],
    )
    s = results["server_round_seconds"]
    m = results["server_memory_kib_per_client"]
    rows = [
        (
            "client round, XOR, 10 x 150",
            f"{c['batched_s']:.2f} s vs {c['per_solution_s']:.1f} s per-solution "
            f"(a default round, which stops early: {c['default_round_s']:.3f} s)",
            f"{c['speedup']:.0f}x",
            ">= 30x",
        ),
        (
            f"population scoring, 3-layer dense ({p['genes']} genes), population 50",
            f"{p['batched_s'] * 1e3:.2f} ms vs {p['per_solution_s'] * 1e3:.0f} ms",
            f"{p['speedup']:.0f}x",
            ">= 50x",
        ),
        (
            f"rounds to accuracy 1.0, {v['seeds']} seeds, defaults",
            f"converged {v['converged_fraction']:.0%}, median {v['median_rounds']}, "
            f"worst {v['worst_rounds']}",
            f"centralized median {v['centralized_rounds']}",
            "all; median <= 5; worst <= 15",
        ),
        (
            "make demo wall time, installed",
            f"{results['demo_seconds']:.1f} s",
            "",
            "< 20 s",
        ),
        (
            "server round, 10 / 100 / 500 clients",
            " / ".join(f"{s[k]:.3f} s" for k in ("10", "100", "500")),
            " / ".join(f"{m[k]:.0f} KiB" for k in ("10", "100", "500")) + " per client",
            "linear; 500 < 2 s",
        ),
    ]
    lines = ["| benchmark | measured | compared | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows]
    return "\n".join(lines)


def write_report(results: dict, text: str) -> None:
    REPORT.write_text(
        "# Benchmarks\n\n"
        "Produced by `make bench` (`python -m bench.run`); this file and "
        "`bench/results.json` are rewritten by every run.\n\n"
        f"Last run: {results['when']} on {results['machine']}.\n\n"
        f"{text}\n\n"
        "- Client round: one client's GA round on its two XOR rows; the "
        "baseline scores each solution with `pygad.kerasga.predict`.\n"
        "- Population scoring: `PopulationScorer.predict` on 50 weight vectors "
        "against 50 `pygad.kerasga.predict` calls (64 rows of 8 features).\n"
        "- Rounds: `common.simulation` (the server's rounds without sockets, "
        "checked against the networked run by the tests), default settings, "
        "seeds 0 to 19; centralized is one client holding all four rows.\n"
        "- Server round: fake protocol clients on loopback that reply at once "
        "with the received weights; seconds per round from `history.csv` "
        "(median of the rounds), memory from the server's resident set size "
        "after all clients joined, minus before.\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions and seeds (smoke test)"
    )
    args = parser.parse_args()
    repeat, seeds = (1, 3) if args.quick else (5, 20)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)

    results: dict = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }
    steps = [
        ("client_round", lambda: bench_client_round(repeat)),
        ("population_scoring", lambda: bench_population_scoring(repeat)),
        ("convergence", lambda: bench_convergence(seeds, 40)),
        ("demo_seconds", lambda: bench_demo(out / "demo")),
        ("server", lambda: measure_server_rounds((10, 100, 500), out / "server")),
    ]
    for name, step in steps:
        started = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        results[name] = step()
        print(
            f"[bench] {name} done in {time.perf_counter() - started:.1f}s", flush=True
        )

    server = results.pop("server")
    results["server_round_seconds"] = server["seconds"]
    results["server_memory_kib_per_client"] = server["kib_per_client"]
    convergence = results["convergence"]
    results.update(
        client_round_speedup=results["client_round"]["speedup"],
        population_scoring_speedup=results["population_scoring"]["speedup"],
        converged_fraction=convergence["converged_fraction"],
        median_rounds=convergence["median_rounds"],
        worst_rounds=convergence["worst_rounds"],
        centralized_rounds=convergence["centralized_rounds"],
    )
    text = table(results)
    print(text)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    if not args.quick:
        write_report(results, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
