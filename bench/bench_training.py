"""How long the reference service takes to make its data and train a model version.

    python bench/bench_training.py [--repeat N]

Times :func:`service.data.generate` (the seeded 7,043-row Telco-like table) and
:func:`service.pipeline.train` (split, fit, evaluate, profile, write a version), each in a fresh
temporary models directory, and reports the fit alone as training records it (``fit_seconds``
in metrics.json: the README's "in about 0.2 s"). Targets: generate <= 0.5 s, train <= 5 s.
Prints the best and median of ``--repeat`` runs; these were asserted inside the tests before,
where a busy machine made them fail for no defect.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.data import generate
from service.pipeline import train

TARGETS = {"generate": 0.5, "train": 5.0}  # seconds


def seconds(call: Callable[[], Any], repeat: int) -> list[float]:
    found = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        found.append(time.perf_counter() - started)
    return found


FITS: list[float] = []


def train_once() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-service-") as directory:
        FITS.append(float(train(models_dir=Path(directory)).metrics["fit_seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    train_once()  # imports and first-call caches out of the measurement
    FITS.clear()
    for name, call in (("generate", generate), ("train", train_once)):
        runs = seconds(call, args.repeat)
        best, median = min(runs), statistics.median(runs)
        verdict = "met" if median <= TARGETS[name] else "MISSED"
        print(
            f"{name:<9} best {best:.3f} s  median {median:.3f} s  "
            f"(target {TARGETS[name]} s: {verdict})"
        )
    print(f"fit      best {min(FITS):.3f} s  median {statistics.median(FITS):.3f} s")


if __name__ == "__main__":
    main()
