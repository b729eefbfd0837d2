"""Helpers of the end-to-end tests: the churn service under gunicorn, a real Prometheus, and
the Python computations their PromQL results are compared with.

Builds on :mod:`support` (``GunicornServer``, ``PrometheusServer``, ``wait_until``)::

    models = train_versions(tmp / "models", 2)
    with running(prometheus := PrometheusServer([...]), service := ServiceServer(models, ...)):
        answer = pinned_request(service, "POST", "/predict", body, accept=lambda pid: ...)
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from support import REPO, SERVICE_TOKENS, GunicornServer, PrometheusServer, parallel, wait_until

from ml_wsgi_metrics.profile import UNSEEN, CategoricalProfile, NumericProfile, ReferenceProfile
from service.data import TARGET, generate, preprocess
from service.pipeline import LATEST_FILE, PROFILE_FILE, load_config, train
from service.validation import parse_json, parse_rows, rows_to_frame

__all__ = [
    "EPS",
    "MODEL",
    "SECRET_KEY",
    "Answer",
    "Expectation",
    "Image",
    "ServiceServer",
    "assert_close",
    "bin_counts",
    "chromium",
    "decode_png",
    "feature_rows",
    "parallel",
    "pinned_request",
    "predict_body",
    "profile_path",
    "prometheus_increase",
    "psi",
    "publish",
    "range_samples",
    "rules_increase",
    "running",
    "score_batches",
    "serve_version",
    "service_features",
    "serving_worker",
    "train_versions",
    "write_rules",
]

#: The service's model name (``service/config.json``).
MODEL = load_config().name
#: The prediction-id key every instance of a test shares.
SECRET_KEY = "e2e-test-secret-key"
EPS = 1e-4  # the rules' clamp of live and reference shares


# -- models, rules ----------------------------------------------------------------------------


def train_versions(models_dir: Path, count: int) -> list[ReferenceProfile]:
    """Train ``count`` versions (identical models, 0.3 s each); ``LATEST`` names the last."""
    for _ in range(count):
        train(models_dir=models_dir)
    root = models_dir / MODEL
    return [ReferenceProfile.load(root / str(v) / PROFILE_FILE) for v in range(1, count + 1)]


def profile_path(models_dir: Path, version: str) -> Path:
    """Where version ``version``'s reference profile is saved."""
    return models_dir / MODEL / version / PROFILE_FILE


def publish(models_dir: Path, version: str) -> None:
    """Point ``LATEST`` at ``version`` (atomically, as a deployment would)."""
    root = models_dir / MODEL
    temporary = root / f".{LATEST_FILE}.e2e"
    temporary.write_text(f"{version}\n")
    os.replace(temporary, root / LATEST_FILE)


def serve_version(models_dir: Path, version: str, servers: Sequence[GunicornServer]) -> None:
    """Publish ``version`` and wait until every worker of every server serves it (each
    re-reads ``LATEST`` at its next request, at most once a second); ``/healthz`` is not
    measured."""
    publish(models_dir, version)

    def served(server: GunicornServer) -> bool:
        answers = server.each_worker("/healthz").values()
        return all(json.loads(body)["version"] == version for _, body in answers)

    for server in servers:
        wait_until(
            lambda server=server: served(server),
            15,
            interval=0.2,
            message=f"not every worker of {server.url} serves version {version}",
        )


def write_rules(profiles: Sequence[Path], path: Path, **options: str | int | float) -> Path:
    """``python -m ml_wsgi_metrics rules`` for ``profiles`` into ``path``, checked by promtool."""
    command = [sys.executable, "-m", "ml_wsgi_metrics", "rules", "--output", str(path)]
    for profile in profiles:
        command += ["--profile", str(profile)]
    for name, value in options.items():
        command += ["--" + name.replace("_", "-"), str(value)]
    for step in (command, ["promtool", "check", "rules", str(path)]):
        done = subprocess.run(step, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(step)}:\n{done.stdout}{done.stderr}"
    return path


# -- servers ----------------------------------------------------------------------------------


class ServiceServer(GunicornServer):
    """The churn service (``service.app:app``) under the repo's ``gunicorn.conf.py``.

    :param models_dir: shared by every instance of a test (same versions, same ``LATEST``).
    :param multiproc_dir: ``PROMETHEUS_MULTIPROC_DIR``; emptied by gunicorn at each start.
    :param port: bind this port (a restarted instance keeps its address) instead of a free one.

    The test tokens (``support.SERVICE_TOKENS``) open ``/feedback`` and ``/pipeline``.
    """

    def __init__(
        self,
        models_dir: Path,
        *,
        multiproc_dir: Path,
        workers: int = 4,
        preload: bool = False,
        port: int | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> None:
        multiproc_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        super().__init__(
            "service.app:app",
            env={
                "CHURN_MODELS_DIR": str(models_dir),
                "ML_WSGI_METRICS_SECRET_KEY": SECRET_KEY,
                **SERVICE_TOKENS,
                "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir),
                "GUNICORN_PRELOAD": "1" if preload else "0",
                **(env or {}),
            },
            workers=workers,
            port=port,
            startup_timeout=60.0,
        )


@contextlib.contextmanager
def running(*servers: GunicornServer | PrometheusServer) -> Iterator[None]:
    """Start every server at once (Prometheus' ~6 s first-scrape wait overlaps the others'
    start), stop them all on exit, whatever happens."""
    with ExitStack() as stack:
        for server in servers:
            stack.push(server.__exit__)
        parallel(lambda server: server.__enter__(), servers, threads=len(servers))
        yield


class Answer(NamedTuple):
    status: int
    body: bytes
    pid: int  # the gunicorn worker that served the request

    def json(self) -> Any:
        return json.loads(self.body)


def serving_worker(server: GunicornServer, client_port: int, timeout: float = 15.0) -> int:
    """The worker that accepted the connection a client opened from ``client_port``."""
    pids = server.worker_pids()
    return wait_until(
        lambda: server.worker_serving(client_port, pids),
        timeout,
        interval=0.002,
        message="no worker took the connection",
    )


def pinned_request(
    server: GunicornServer,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    accept: Callable[[int], bool] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Answer:
    """Send one request on a connection whose worker is known, and ``accept``-ed, beforehand.

    A sync worker holds the connection it accepted while it waits for the request, so the
    worker is found from ``/proc`` before anything is sent. A connection taken by a worker
    ``accept`` refuses carries a ``GET /healthz`` instead (not measured) and another is opened.
    ``headers`` go with the request (e.g. a token), not with the ``GET /healthz``.
    """
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        connection.sock = sock
        try:
            pid = serving_worker(server, sock.getsockname()[1])
            chosen = accept is None or accept(pid)
            sent = {"Connection": "close"}
            if chosen and body is not None:
                sent["Content-Type"] = "application/json"
            if chosen:
                connection.request(method, path, body=body, headers=sent | dict(headers or {}))
            else:
                connection.request("GET", "/healthz", headers=sent)
            response = connection.getresponse()
            data = response.read()
            if chosen:
                return Answer(response.status, data, pid)
        finally:
            connection.close()
    raise AssertionError(f"no accepted worker took a connection to {server.url}")


# -- Prometheus -------------------------------------------------------------------------------


def range_samples(
    prometheus: PrometheusServer, selector: str, since: float, until: float | None = None
) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
    """The raw samples of ``selector`` stored with timestamps in ``[since, until]``."""
    until = time.time() if until is None else until
    seconds = max(1, math.ceil(until - since) + 1)
    found = []
    for series in prometheus.query(f"{selector}[{seconds}s]", time=until):
        values = [(float(t), float(v)) for t, v in series["values"] if since <= float(t) <= until]
        if values:
            found.append((series["metric"], values))
    return found


def assert_close(
    name: str, actual: float | None, expected: float, *, rel: float, abs_: float = 1e-12
) -> float:
    """Assert ``actual`` equals ``expected`` within ``rel`` (relative) or ``abs_``; return the
    relative error."""
    assert actual is not None, f"{name}: Prometheus returned nothing (expected {expected!r})"
    error = abs(actual - expected) / max(abs(expected), abs_)
    assert math.isclose(actual, expected, rel_tol=rel, abs_tol=abs_), (
        f"{name}: Prometheus {actual!r} != Python {expected!r} (relative error {error:.3g})"
    )
    return error if abs(expected) > abs_ else 0.0


# -- traffic ----------------------------------------------------------------------------------


def feature_rows(
    rows: int,
    seed: int,
    *,
    scale: Mapping[str, float] | None = None,
    unseen: Mapping[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Request rows of the Telco schema (the raw CSV form, no label) and their labels.

    ``scale`` multiplies numeric columns (``{"MonthlyCharges": 1.3}``: drift), rounded to cents;
    ``unseen`` puts a category the model never saw in every tenth row of a column.
    """
    frame = generate(rows, seed=seed)
    for column, factor in (scale or {}).items():
        frame[column] = (frame[column] * factor).round(2)
    for column, category in (unseen or {}).items():
        frame.loc[frame.index % 10 == 0, column] = category
    labels = frame[TARGET].tolist()
    payload = json.loads(frame.drop(columns=[TARGET]).to_json(orient="records"))
    return payload, labels


def predict_body(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return json.dumps({"rows": list(rows)}).encode()


def service_features(body: bytes, columns: Sequence[str]) -> pd.DataFrame:
    """The features the service scores and records for a ``/predict`` body (its own parsing
    and preprocessing, applied to exactly the bytes sent)."""
    rows, _ = parse_rows(parse_json(body, "application/json"), max_rows=10**6)
    return preprocess(rows_to_frame(rows)[list(columns)])


# -- the Python side ----------------------------------------------------------------------------


def psi(counts: Sequence[float], shares: Sequence[float], eps: float = EPS) -> float:
    """PSI of live bin ``counts`` against reference ``shares``, both clamped at ``eps``."""
    total = math.fsum(counts)
    value = 0.0
    for count, share in zip(counts, shares, strict=True):
        live, reference = max(count / total, eps), max(share, eps)
        value += (live - reference) * math.log(live / reference)
    return value


def bin_counts(feature: NumericProfile | CategoricalProfile, values: Sequence[Any]) -> list[int]:
    """Counts per reference bin (missing values left out), found independently of the package:
    numeric bin ``i`` is ``(edges[i-1], edges[i]]``; categories outside the vocabulary are
    :data:`UNSEEN`, the last bin."""
    counts = [0] * (len(feature.shares))
    if isinstance(feature, NumericProfile):
        for value in values:
            if value is not None and math.isfinite(value):
                counts[bisect_left(feature.edges, value)] += 1
        return counts
    position = {category: i for i, category in enumerate(feature.categories)}
    for value in values:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        counts[position.get(str(value), len(feature.categories))] += 1
    assert feature.bins[-1] == UNSEEN
    return counts


@dataclass
class Expectation:
    """What the recording rules should compute for one model version, from rows and labels.

    ``add`` takes the features the service recorded and the scores it computed; ``label``
    one (predicted, actual) pair of feedback.
    """

    profile: ReferenceProfile
    frames: list[pd.DataFrame] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, features: pd.DataFrame, scores: Sequence[float]) -> None:
        self.frames.append(features)
        self.scores.extend(float(s) for s in scores)

    def label(self, predicted: str, actual: str) -> None:
        self.pairs[(predicted, actual)] += 1

    @property
    def rows(self) -> int:
        return len(self.scores)

    def _features(self) -> pd.DataFrame:
        return pd.concat(self.frames, ignore_index=True)

    def distributions(self) -> dict[tuple[str, str], float]:
        """``{(statistic, feature): value}``: psi per feature and for ``score``; mean and
        population stddev of every numeric feature and of the score."""
        frame = self._features()
        found: dict[tuple[str, str], float] = {}
        columns: list[tuple[NumericProfile | CategoricalProfile, list[Any]]] = [
            (f, frame[f.name].tolist()) for f in self.profile.features
        ]
        assert self.profile.score is not None
        columns.append((self.profile.score, self.scores))
        for feature, values in columns:
            name = "score" if feature is self.profile.score else feature.name
            found[("psi", name)] = psi(bin_counts(feature, values), feature.shares)
            if isinstance(feature, NumericProfile):
                finite = [float(v) for v in values if v is not None and math.isfinite(v)]
                mean = math.fsum(finite) / len(finite)
                found[("mean", name)] = mean
                found[("stddev", name)] = math.sqrt(
                    math.fsum((v - mean) ** 2 for v in finite) / len(finite)
                )
        return found

    def accuracy(self) -> dict[str, float]:
        """Accuracy, and precision and recall of each class, over the feedback given."""
        total = sum(self.pairs.values())
        found = {"accuracy": sum(n for (p, a), n in self.pairs.items() if p == a) / total}
        for label in self.profile.classes or ():
            hits = self.pairs[(label, label)]
            predicted = sum(n for (p, _), n in self.pairs.items() if p == label)
            actual = sum(n for (_, a), n in self.pairs.items() if a == label)
            if predicted:
                found[f"precision:{label}"] = hits / predicted
            if actual:
                found[f"recall:{label}"] = hits / actual
        return found


def score_batches(model: Any, frames: Sequence[pd.DataFrame], positive: str) -> list[np.ndarray]:
    """The positive-class probability of each batch, as the service computes it."""
    column = [str(c) for c in model.classes_].index(positive)
    return [model.predict_proba(frame)[:, column] for frame in frames]


# -- headless Chromium ---------------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium(profile_dir: Path, *arguments: str, timeout: float = 60.0) -> str:
    """Run Debian's ``chromium`` headless with a private profile; its stdout."""
    command = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


@dataclass(frozen=True)
class Image:
    """A decoded 8-bit RGB(A) PNG: ``pixels[y, x]`` is ``(r, g, b)``."""

    width: int
    height: int
    pixels: np.ndarray


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def decode_png(data: bytes) -> Image:
    """Decode a non-interlaced 8-bit RGB or RGBA PNG (what Chromium writes) with zlib and
    struct; the five scanline filters of the PNG specification, vectorised where they allow."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    position, compressed, header = 8, [], None
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            compressed.append(body)
        position += 12 + length
    assert header is not None, "no IHDR chunk"
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, color {color}, interlace {interlace}")
    channels = 3 if color == 2 else 4
    stride = width * channels
    raw = zlib.decompress(b"".join(compressed))
    rows = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], np.frombuffer(raw, np.uint8, stride, start + 1)
        if kind == 0:
            row = line.copy()
        elif kind == 1:  # Sub: a running sum per channel
            row = np.cumsum(line.reshape(width, channels), axis=0, dtype=np.uint64)
            row = (row % 256).astype(np.uint8).reshape(stride)
        elif kind == 2:  # Up
            row = line + previous
        elif kind in (3, 4):  # Average, Paeth: byte by byte
            out = bytearray(stride)
            up = previous.tolist()
            for i, value in enumerate(line.tolist()):
                left = out[i - channels] if i >= channels else 0
                corner = up[i - channels] if i >= channels else 0
                guess = (left + up[i]) // 2 if kind == 3 else _paeth(left, up[i], corner)
                out[i] = (value + guess) & 0xFF
            row = np.frombuffer(bytes(out), np.uint8)
        else:
            raise ValueError(f"bad filter type {kind} on row {y}")
        rows[y] = previous = row
    pixels = rows.reshape(height, width, channels)[:, :, :3]
    return Image(width, height, pixels)


def rules_increase(
    samples: Sequence[tuple[int, float]], start: int, end: int, lookback: int = 300_000
) -> float | None:
    """What the rules' increase (:func:`ml_wsgi_metrics._promql.exact_increase`) gives for
    one counter's raw ``(ms, value)`` samples (from ``lookback`` before ``start`` on) over the
    window ``[start, end]``: ``None`` with no sample in the window; its last sample less its
    baseline (its last sample by ``start``, within ``lookback``; else 0) when it never went
    down from ``start - lookback`` on, plus its largest in the window when it went down once,
    in the window, and stayed below; else :func:`prometheus_increase`. Staleness markers,
    which range queries do not return, are not modelled."""
    window = [v for t, v in samples if start <= t <= end]
    if not window:
        return None
    before = [v for t, v in samples if start - lookback < t <= start]
    baseline = before[-1] if before else 0.0
    widened = [v for t, v in samples if start - lookback <= t <= end]
    resets = sum(later < earlier for earlier, later in itertools.pairwise(widened))
    if resets == 0:
        return window[-1] - baseline
    within = sum(later < earlier for earlier, later in itertools.pairwise(window))
    if resets == within == 1 and max(window) > window[-1]:
        return max(window) + window[-1] - baseline
    return prometheus_increase([(t, v) for t, v in samples if start <= t <= end], start, end)


def prometheus_increase(samples: Sequence[tuple[int, float]], start: int, end: int) -> float:
    """``increase()`` of Prometheus 2.42 over a counter's raw ``(ms, value)`` samples selected
    by a range ``[start, end]`` (ms): resets corrected, then the result extrapolated towards the
    range's ends as ``extrapolatedRate`` in ``promql/functions.go`` does."""
    assert len(samples) >= 2, "increase() needs two samples"
    correction, last = 0.0, 0.0
    for _, value in samples:
        if value < last:
            correction += last
        last = value
    (first_ms, first), (last_ms, _) = samples[0], samples[-1]
    result = last - first + correction
    to_start, to_end = (first_ms - start) / 1000, (end - last_ms) / 1000
    sampled = (last_ms - first_ms) / 1000
    average = sampled / (len(samples) - 1)
    if result > 0 and first >= 0:
        to_start = min(to_start, sampled * (first / result))
    threshold = average * 1.1
    interval = sampled
    interval += to_start if to_start < threshold else average / 2
    interval += to_end if to_end < threshold else average / 2
    return result * (interval / sampled)
