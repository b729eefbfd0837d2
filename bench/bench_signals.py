"""How much recording a prediction costs, beside scikit-learn's own ``predict_proba``.

    python bench/bench_signals.py [--quick]

Records 1 row (a dict: the single-row fast path) and 1,000 rows (a DataFrame) of 20 features,
with scores and predicted classes, in single-process mode and in multiprocess mode (slot files
in a temporary directory). Prediction ids are measured separately: they are signed only when
read. Feedback is measured per id, each id fresh (an id counts once: the replay check is in it,
in memory in single-process mode, in the directory's SQLite file in multiprocess mode). Two
schemas: 20 numeric features, and a Telco-like mix of 5 numeric and 15 categorical.
Targets (multiprocess): <= 50 us for 1 row, <= 2 ms for 1,000 rows. Prints microseconds (the
best of several repeats, each the mean of many calls).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml_wsgi_metrics import multiprocess, signals
from ml_wsgi_metrics.profile import build_profile
from ml_wsgi_metrics.testing import reset_signals

CATEGORIES = ["No", "Yes", "No internet service", "Month-to-month", "One year", "Two year"]


def make_frame(rows: int, numeric: int, categorical: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    columns: dict[str, Any] = {f"num{i}": rng.normal(60, 25, rows) for i in range(numeric)}
    for i in range(categorical):
        columns[f"cat{i}"] = rng.choice(CATEGORIES[i % 3 : i % 3 + 3], rows)
    return pd.DataFrame(columns)


def best_us(call: Callable[[], Any], number: int, repeat: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def fit_model(frame: pd.DataFrame, target: np.ndarray) -> Pipeline:
    numeric = [c for c in frame if c.startswith("num")]
    categorical = [c for c in frame if c.startswith("cat")]
    encode = ColumnTransformer(
        [("num", StandardScaler(), numeric)]
        + ([("cat", OneHotEncoder(handle_unknown="ignore"), categorical)] if categorical else [])
    )
    return Pipeline([("encode", encode), ("model", LogisticRegression(max_iter=500))]).fit(
        frame, target
    )


def run(schema: str, numeric: int, categorical: int, quick: bool) -> None:
    scale = 10 if quick else 1
    reference = make_frame(5000, numeric, categorical, seed=1)
    target = (reference["num0"] + reference["num1"] > 120).map({True: "Yes", False: "No"})
    model = fit_model(reference, target.to_numpy())
    positive = list(model.classes_).index("Yes")
    batch = make_frame(1000, numeric, categorical, seed=2)
    row_frame = batch.iloc[:1]
    row = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in batch.iloc[0].items()}
    scores = model.predict_proba(batch)[:, positive]
    classes = np.where(scores > 0.5, "Yes", "No")
    profile = build_profile(
        reference,
        model="bench",
        version="1",
        scores=model.predict_proba(reference)[:, positive],
        classes=["No", "Yes"],
    )

    encoded_row = model[:-1].transform(row_frame)
    encoded = model[:-1].transform(batch)
    estimator = model[-1]
    sklearn_1 = best_us(lambda: estimator.predict_proba(encoded_row), 2000 // scale, 5)
    sklearn_1000 = best_us(lambda: estimator.predict_proba(encoded), 500 // scale, 5)
    pipeline_1 = best_us(lambda: model.predict_proba(row_frame), 200 // scale, 5)
    pipeline_1000 = best_us(lambda: model.predict_proba(batch), 50 // scale, 5)
    print(f"\n{schema}: 20 features ({numeric} numeric, {categorical} categorical)")
    print(f"  sklearn Pipeline.predict_proba   1 row {pipeline_1:9.1f} us   1,000 rows "
          f"{pipeline_1000:9.1f} us   (encoding + model)")  # fmt: skip
    print(f"  LogisticRegression.predict_proba 1 row {sklearn_1:9.1f} us   1,000 rows "
          f"{sklearn_1000:9.1f} us   (on encoded rows)")  # fmt: skip
    for mode in ("single-process", "multiprocess"):
        with tempfile.TemporaryDirectory() as directory:
            if mode == "multiprocess":
                multiprocess.activate(directory)
            try:
                signals.configure(registry=CollectorRegistry(), secret_key="bench")
                signals.register_model(profile)
                one = best_us(
                    lambda: signals.record_prediction(row, scores=0.3, classes="No"),
                    5000 // scale,
                    5,
                )
                many = best_us(
                    lambda: signals.record_prediction(batch, scores=scores, classes=classes),
                    200 // scale,
                    5,
                )
                one_id = best_us(
                    lambda: signals.record_prediction(row, scores=0.3, classes="No").ids,
                    2000 // scale,
                    3,
                )
                ids = best_us(
                    lambda: signals.record_prediction(batch, scores=scores, classes=classes).ids,
                    10 // scale or 1,
                    3,
                )
                # an id counts once: fresh ids for every call (10 x 3 x 100 at most)
                fresh = iter(
                    [
                        token
                        for _ in range(3)
                        for token in signals.record_prediction(
                            batch, scores=scores, classes=classes
                        ).ids
                    ]
                )
                feedback = (
                    best_us(
                        lambda fresh=fresh: [
                            signals.record_feedback(next(fresh), "Yes") for _ in range(100)
                        ],
                        10 // scale or 1,
                        3,
                    )
                    / 100
                )
            finally:
                reset_signals()
                if mode == "multiprocess":
                    multiprocess.deactivate()
        print(
            f"  {mode:15} record           1 row {one:9.1f} us   1,000 rows {many:9.1f} us"
            f"   ({one / sklearn_1:.2f}x / {many / sklearn_1000:.1f}x LogisticRegression)"
        )
        print(f"  {'':15} record + ids      1 row {one_id:9.1f} us   1,000 rows {ids:9.1f} us"
              f"   feedback {feedback:.1f} us per id")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args()
    print("targets (multiprocess): <= 50 us for 1 row, <= 2,000 us for 1,000 rows")
    run("numeric", 20, 0, args.quick)
    run("mixed", 5, 15, args.quick)


if __name__ == "__main__":
    main()
