"""Realistic traffic for the churn service, with an optional drift phase and delayed feedback.

    python -m service.loadgen --url http://127.0.0.1:8000 --requests 2000 --concurrency 8 \\
        --drift-from 1000 --flip 0.3 --feedback-delay 2

Rows are sampled from the data set the model was trained on (:mod:`service.data`, as
``service/config.json`` describes it) and sent as single rows and small batches to
``POST /predict``, with a few ``GET /`` and rare ``GET /predict`` (the results page: it scores
the 1,409 held-out rows and records none of them; request 0, ``page_every``, ... of the
undrifted part), some bad requests (4xx) and unknown paths. From request ``drift_from`` on,
rows drift (MonthlyCharges inflated by 10-20 %, a share of one- and two-year contracts turned
month-to-month). Ground truth, the data's
``Churn``, is posted to ``POST /feedback`` ``feedback_delay`` seconds after each prediction,
flipped with probability ``flip`` where rows drift (everywhere without ``drift_from``), with the
back office's token (``$CHURN_FEEDBACK_TOKEN``, as the service reads it).

Bounded in count and time, 127.0.0.1 only, never retries (a retry could count a request
twice). :func:`run` returns a :class:`Summary`: requests by ``(method, route, status)`` with
``route`` as the metrics label it (the route template, ``<unmatched>`` for unknown paths and
refused methods), so it can be compared with ``http_requests_total``.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import http.client
import itertools
import json
import os
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.loadplan import DEFAULT_DRIFT, JSON, Drift, Request, dumps, load_rows, plan_requests

__all__ = ["Drift", "Summary", "load_rows", "main", "run"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
FEEDBACK_BATCH = 100
#: Where :func:`run` reads the token it presents to ``POST /feedback`` by default.
FEEDBACK_TOKEN_ENV = "CHURN_FEEDBACK_TOKEN"


@dataclass
class Summary:
    """What :func:`run` sent and what came back."""

    #: ``(method, route, status)`` -> requests; status ``"error"`` for a network error.
    requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    #: Requests by kind: ``single``, ``batch``, ``page``, ``index``, ``unknown``, ``bad:<kind>``.
    kinds: Counter[str] = field(default_factory=Counter)
    rows: int = 0  #: rows scored by ``POST /predict`` (answered 200)
    drifted_rows: int = 0
    pages: int = 0  #: ``GET /predict`` answered 200
    #: rows scored per ``"model version"`` (from the answers)
    versions: Counter[str] = field(default_factory=Counter)
    feedback_items: int = 0  #: labels posted
    feedback_flipped: int = 0
    feedback_accepted: int = 0
    feedback_dropped: int = 0  #: labels still waiting when the time bound was reached
    errors: int = 0  #: network errors (not retried)
    seconds: float = 0.0

    def add(self, other: Summary) -> Summary:
        """The sum of two summaries (two phases of one run)."""
        total = Summary()
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(total, name, mine + theirs)
        return total

    def count(self, method: str | None = None, route: str | None = None, status: str = "") -> int:
        """Requests matching ``method``, ``route`` and a status prefix (``"2"``, ``"404"``)."""
        return sum(
            n
            for (m, r, s), n in self.requests.items()
            if (method is None or m == method)
            and (route is None or r == route)
            and s.startswith(status)
        )

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["requests"] = [
            {"method": m, "route": r, "status": s, "count": n}
            for (m, r, s), n in sorted(self.requests.items())
        ]
        data["kinds"] = dict(sorted(self.kinds.items()))
        data["versions"] = dict(self.versions)
        data["seconds"] = round(self.seconds, 3)
        return data

    def format(self) -> str:
        total = sum(self.requests.values())
        rate = total / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"{total} requests in {self.seconds:.1f} s ({rate:.0f}/s), {self.errors} network errors"
        ]
        lines += [
            f"  {m:<6} {r:<14} {s:>5} {n:>7}" for (m, r, s), n in sorted(self.requests.items())
        ]
        versions = ", ".join(f"{v}: {n}" for v, n in sorted(self.versions.items())) or "none"
        lines.append(
            f"  rows scored {self.rows} ({self.drifted_rows} drifted) by {versions}; "
            f"{self.pages} results pages"
        )
        lines.append(
            f"  feedback {self.feedback_items} labels ({self.feedback_flipped} flipped), "
            f"{self.feedback_accepted} accepted, {self.feedback_dropped} dropped"
        )
        return "\n".join(lines)


def _send(
    base: urllib.parse.SplitResult,
    method: str,
    path: str,
    body: bytes | None,
    content_type: str | None,
    timeout: float,
    token: str | None = None,
) -> tuple[int, bytes]:
    """One request on a fresh connection (gunicorn's sync workers close it anyway), with
    ``token`` as ``Authorization: Bearer``."""
    connection = http.client.HTTPConnection(base.hostname, base.port, timeout=timeout)
    try:
        headers = {"Connection": "close"}
        if content_type:
            headers["Content-Type"] = content_type
        if token:
            headers["Authorization"] = f"Bearer {token}"
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class _Feedback:
    """Labels waiting for their due time, posted in batches by one thread."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, str]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()

    def put(self, due: float, items: Sequence[tuple[str, str]]) -> None:
        with self._lock:
            for prediction_id, actual in items:
                heapq.heappush(self._heap, (due, next(self._order), prediction_id, actual))

    def due(self, now: float, limit: int) -> list[tuple[str, str]]:
        with self._lock:
            taken = []
            while self._heap and self._heap[0][0] <= now and len(taken) < limit:
                _, _, prediction_id, actual = heapq.heappop(self._heap)
                taken.append((prediction_id, actual))
            return taken

    def __len__(self) -> int:
        with self._lock:
            return len(self._heap)


def run(
    url: str = "http://127.0.0.1:8000",
    requests: int = 1000,
    concurrency: int = 8,
    *,
    drift_from: int | None = None,
    drift: Drift = DEFAULT_DRIFT,
    flip: float = 0.0,
    feedback_delay: float = 2.0,
    feedback_rate: float = 1.0,
    page_every: int = 1000,
    rate: float | None = None,
    seed: int = 0,
    max_seconds: float = 300.0,
    timeout: float = 30.0,
    data: tuple[list[dict[str, Any]], list[str]] | None = None,
    stop: threading.Event | None = None,
    feedback_token: str | None = None,
) -> Summary:
    """Send ``requests`` requests (plus feedback posts) and return what was sent and answered.

    :param drift_from: index of the first drifted request (``None``: no drift).
    :param flip: probability that a label posted for a drifted row (for any row without
        ``drift_from``) is the wrong one, to make accuracy drop.
    :param feedback_delay: seconds between a prediction and its label; ``feedback_rate`` is
        the share of predicted rows that get one.
    :param page_every: a ``GET /predict`` as request 0, ``page_every``, ... of the undrifted
        part (0: none).
    :param rate: requests per second over all clients (``None``: as fast as answered).
    :param max_seconds: stop sending, and drop labels not yet due, after this long.
    :param data: ``(rows, labels)`` to sample (default: :func:`load_rows`).
    :param stop: set it to stop early (the run returns what it did so far).
    :param feedback_token: presented to ``POST /feedback`` (default ``$CHURN_FEEDBACK_TOKEN``).
    """
    base = urllib.parse.urlsplit(url)
    if base.scheme != "http" or base.hostname not in LOCAL_HOSTS or base.port is None:
        raise ValueError(f"url: http://127.0.0.1:<port> only, got {url!r}")
    if requests < 0 or concurrency < 1:
        raise ValueError("requests must be >= 0 and concurrency >= 1")
    if not 0.0 <= flip <= 1.0 or not 0.0 <= feedback_rate <= 1.0:
        raise ValueError("flip and feedback_rate are probabilities")
    rows, labels = data if data is not None else load_rows()
    rng = np.random.default_rng(seed)
    plan = plan_requests(requests, rows, rng, drift_from, drift, page_every)
    gets_label = rng.random(sum(len(r.rows) for r in plan)) < feedback_rate
    flips = rng.random(len(gets_label)) < flip
    labelling = _Labelling(labels, gets_label, flips, flip_everywhere=drift_from is None)
    token = feedback_token if feedback_token is not None else os.environ.get(FEEDBACK_TOKEN_ENV)
    traffic = _Traffic(
        base,
        plan,
        labelling,
        token=token,
        rate=rate,
        feedback_delay=feedback_delay,
        timeout=timeout,
        max_seconds=max_seconds,
        stop=stop if stop is not None else threading.Event(),
    )
    return traffic.run(concurrency)


class _Labelling:
    """The label each predicted row gets: whether it gets one, and whether it is flipped,
    decided up front per row of the plan (in plan order)."""

    def __init__(
        self,
        labels: Sequence[str],
        gets_label: np.ndarray,
        flips: np.ndarray,
        *,
        flip_everywhere: bool,
    ) -> None:
        self.labels = labels
        self.gets_label = gets_label
        self.flips = flips
        self.flip_everywhere = flip_everywhere

    def labels_of(
        self, request: Request, first: int, ids: Sequence[str]
    ) -> tuple[list[tuple[str, str]], int]:
        """``(id, actual)`` to post for the rows of ``request`` (whose first row is row
        ``first`` of the plan), and how many of them are flipped."""
        wanted, flipped_count = [], 0
        for k, (row, prediction_id) in enumerate(zip(request.rows, ids, strict=True)):
            if not self.gets_label[first + k]:
                continue
            actual = self.labels[row]
            flipped = bool(self.flips[first + k]) and (request.drifted or self.flip_everywhere)
            if flipped:
                actual = "No" if actual == "Yes" else "Yes"
            wanted.append((prediction_id, actual))
            flipped_count += flipped
        return wanted, flipped_count


class _Traffic:
    """One run: client threads send the plan, one thread posts the labels as they fall due;
    :attr:`summary` collects the answers (under :attr:`lock`)."""

    def __init__(
        self,
        base: urllib.parse.SplitResult,
        plan: Sequence[Request],
        labelling: _Labelling,
        *,
        token: str | None,
        rate: float | None,
        feedback_delay: float,
        timeout: float,
        max_seconds: float,
        stop: threading.Event,
    ) -> None:
        self.base, self.plan, self.labelling = base, plan, labelling
        self.token, self.rate, self.timeout = token, rate, timeout
        self.feedback_delay = feedback_delay
        self.stop = stop
        self.offsets = list(itertools.accumulate((len(r.rows) for r in plan), initial=0))
        self.summary, self.lock = Summary(), threading.Lock()
        self.queue = _Feedback()
        self.next_index = itertools.count()
        self.started = time.monotonic()
        self.deadline = self.started + max_seconds
        self.senders_done = threading.Event()

    def run(self, concurrency: int) -> Summary:
        clients = [threading.Thread(target=self.client, daemon=True) for _ in range(concurrency)]
        sender = threading.Thread(target=self.feedback_sender, daemon=True)
        try:
            for thread in [*clients, sender]:
                thread.start()
            for thread in clients:
                while thread.is_alive():  # short joins: Ctrl-C reaches the main thread
                    thread.join(0.2)
            self.senders_done.set()
            while sender.is_alive():
                sender.join(0.2)
        finally:
            self.stop.set()
            for thread in [*clients, sender]:
                thread.join(self.timeout + 1)
        self.summary.feedback_dropped = len(self.queue)
        self.summary.seconds = time.monotonic() - self.started
        return self.summary

    def record(self, request: Request, status: str) -> None:
        with self.lock:
            self.summary.requests[(request.method, request.route, status)] += 1
            if request.kind != "feedback":
                self.summary.kinds[request.kind] += 1
            if status == "error":
                self.summary.errors += 1

    def client(self) -> None:
        """Send the plan's next request until none is left (or time is up, or stopped)."""
        while not self.stop.is_set():
            i = next(self.next_index)
            if i >= len(self.plan) or time.monotonic() > self.deadline:
                return
            if self.rate:
                wait = self.started + i / self.rate - time.monotonic()
                if wait > 0 and self.stop.wait(wait):
                    return
            request = self.plan[i]
            token = self.token if request.path == "/feedback" else None
            try:
                status, body = _send(
                    self.base,
                    request.method,
                    request.path,
                    request.body,
                    request.content_type,
                    self.timeout,
                    token,
                )
            except OSError:
                self.record(request, "error")
                continue
            self.record(request, str(status))
            if status == 200:
                self.answered(i, request, body)

    def answered(self, i: int, request: Request, body: bytes) -> None:
        """Count a 200: a results page, or scored rows whose labels are queued."""
        if request.kind == "page":
            with self.lock:
                self.summary.pages += 1
            return
        if not request.rows:
            return
        answer = json.loads(body)
        ids = [p["id"] for p in answer["predictions"]]
        wanted, flipped = self.labelling.labels_of(request, self.offsets[i], ids)
        self.queue.put(time.monotonic() + self.feedback_delay, wanted)
        with self.lock:
            self.summary.rows += len(ids)
            self.summary.drifted_rows += len(ids) if request.drifted else 0
            self.summary.versions[f"{answer['model']} {answer['version']}"] += len(ids)
            self.summary.feedback_flipped += flipped

    def feedback_sender(self) -> None:
        """Post the labels due, in batches, until the clients are done and none is left."""
        while not self.stop.is_set():
            items = self.queue.due(time.monotonic(), FEEDBACK_BATCH)
            if items:
                self.post_feedback(items)
                continue
            if self.senders_done.is_set() and not len(self.queue):
                return
            if time.monotonic() > self.deadline:
                return
            self.stop.wait(0.05)

    def post_feedback(self, items: Sequence[tuple[str, str]]) -> None:
        feedback = Request("POST", "/feedback", "/feedback", "feedback")
        body = dumps({"feedback": [{"id": i, "actual": a} for i, a in items]})
        try:
            status, answer = _send(
                self.base, "POST", "/feedback", body, JSON, self.timeout, self.token
            )
        except OSError:
            self.record(feedback, "error")
            return
        self.record(feedback, str(status))
        with self.lock:
            self.summary.feedback_items += len(items)
            if status == 200:
                self.summary.feedback_accepted += int(json.loads(answer).get("accepted", 0))


def main(argv: Sequence[str] | None = None, out: Callable[[str], Any] = print) -> int:
    """Command line: send the traffic, print the summary (exit 1 after network errors)."""
    parser = argparse.ArgumentParser(
        prog="python -m service.loadgen",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (127.0.0.1)")
    parser.add_argument("--requests", type=int, default=1000, metavar="N")
    parser.add_argument("--concurrency", type=int, default=8, metavar="C")
    parser.add_argument(
        "--drift-from", type=int, metavar="K", help="first drifted request (default: no drift)"
    )
    parser.add_argument("--flip", type=float, default=0.0, help="label flip probability")
    parser.add_argument("--feedback-delay", type=float, default=2.0, metavar="S")
    parser.add_argument("--feedback-rate", type=float, default=1.0, metavar="P")
    parser.add_argument(
        "--page-every", type=int, default=1000, metavar="K", help="GET /predict every K (0: none)"
    )
    parser.add_argument("--rate", type=float, help="requests per second (default: unlimited)")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if not os.environ.get(FEEDBACK_TOKEN_ENV):
        print(
            f"note: {FEEDBACK_TOKEN_ENV} is not set: the service refuses the feedback (set it to "
            "the service's token)",
            file=sys.stderr,
        )
    try:
        summary = run(
            args.url,
            args.requests,
            args.concurrency,
            drift_from=args.drift_from,
            flip=args.flip,
            feedback_delay=args.feedback_delay,
            feedback_rate=args.feedback_rate,
            page_every=args.page_every,
            rate=args.rate,
            seed=args.seed,
            max_seconds=args.max_seconds,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    out(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format())
    return 1 if summary.errors else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
