"""The context API's verbs: binding, registering, configuring, timing, and retiring versions
(live versions, retire_model, other processes' retirements, the record)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict
from signals_support import MODEL, merged, value
from signals_support import churn_profile as churn_profile  # fixture "profile"
from signals_support import signals_registry as signals_registry  # fixture "registry"

from ml_wsgi_metrics import MetricsMiddleware, _config, _context, _retired, multiprocess, signals
from ml_wsgi_metrics._retired import version_key
from ml_wsgi_metrics.exposition import scrape_registry
from ml_wsgi_metrics.profile import (
    ReferenceProfile,
)
from ml_wsgi_metrics.signals import NO_CLASS, InvalidPredictionId
from ml_wsgi_metrics.testing import TEST_SECRET_KEY, isolated_signals


def test_unknown_model_and_binding(registry: CollectorRegistry, profile: ReferenceProfile) -> None:
    with pytest.raises(ValueError, match="not registered"):
        signals.record_prediction({"delta": 1.0}, model="nope", version="1")
    other = ReferenceProfile.from_dict({**profile.to_dict(), "version": "4"})
    signals.register_model(other)
    with pytest.raises(ValueError, match="bind_model"):
        signals.record_prediction({"delta": 1.0})  # two models, none bound
    with signals.model_context("churn", "4"):
        with signals.model_context("churn", "3"):
            signals.record_prediction({"delta": 1.0})
        assert signals.current_model() == ("churn", "4")
        signals.record_prediction({"delta": 1.0})
    assert signals.current_model() is None
    signals.bind_model("churn", "4")
    signals.record_prediction({"delta": 1.0})
    signals.unbind_model()
    for version, count in (("3", 1), ("4", 2)):
        labels = {"model": "churn", "version": version, "class": NO_CLASS}
        assert registry.get_sample_value("model_predictions_total", labels) == count
    with pytest.raises(ValueError, match="give the version"):
        signals.record_prediction(model="churn")


def test_register_model_from_path_idempotent_and_versioned(
    tmp_path: Path, profile: ReferenceProfile
) -> None:
    path = tmp_path / "profile.json"
    profile.save(path)
    with isolated_signals():
        assert signals.register_model(path) == profile
        assert signals.register_model(profile) == profile
        assert signals.registered_models() == [("churn", "3")]
        changed = ReferenceProfile.from_dict({**profile.to_dict(), "rows": profile.rows + 1})
        with pytest.raises(ValueError, match="new version"):
            signals.register_model(changed)


def test_configure_validates(profile: ReferenceProfile) -> None:
    with pytest.raises(ValueError, match="max_feedback_age"):
        signals.configure(max_feedback_age=0)
    with pytest.raises(ValueError, match="unknown setting"):
        signals.configure(buckets=[1])
    with pytest.raises(ValueError, match="const_labels"):
        signals.configure(registry=CollectorRegistry(), const_labels={"model": "x"})
    with isolated_signals(namespace="svc", const_labels={"service": "churn"}) as registry:
        signals.register_model(profile)
        signals.record_prediction({"delta": 1.0})
        labels = {"service": "churn", **MODEL, "class": NO_CLASS}
        assert registry.get_sample_value("svc_model_predictions_total", labels) == 1


def test_latency_and_time_prediction(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    signals.record_prediction({"delta": 1.0}, latency=0.02)
    clock = [1000.0]  # perf_counter, moved by hand: the model "takes" exactly 0.25 s
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    with signals.time_prediction() as timer:
        clock[0] += 0.25
        prediction = timer.record({"delta": 2.0}, scores=0.4, classes="Yes")
    assert timer.elapsed == 0.25
    assert timer.prediction is prediction
    with pytest.raises(RuntimeError), signals.time_prediction():
        clock[0] += 1.0
        raise RuntimeError("the model failed: not a prediction")
    monkeypatch.undo()
    assert value(registry, "model_prediction_latency_seconds_count") == 2
    assert value(registry, "model_prediction_latency_seconds_sum") == 0.02 + 0.25
    assert value(registry, "model_prediction_latency_seconds_bucket", le="0.25") == 2
    assert value(registry, "model_predictions_total", **{"class": "Yes"}) == 1


def test_context_module_is_cheap() -> None:
    code = (
        "import sys, ml_wsgi_metrics._context as c; c.bind('m', '1'); c.reset(); "
        "assert c.current() is None; "
        "print(sorted({'numpy', 'pandas', 'itsdangerous'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    token = _context.bind("a", "1")
    _context.restore(token)
    assert _context.current() is None


def versioned(profile: ReferenceProfile, version: str) -> ReferenceProfile:
    return dataclasses.replace(profile, version=version)


def scraped_by_version(registry: CollectorRegistry) -> Counter[str]:
    """How many series each version has in a scrape (merged files in multiprocess mode)."""
    return Counter(
        sample.labels["version"]
        for metric in scrape_registry(registry).collect()
        for sample in metric.samples
        if sample.labels.get("model") == "churn" and not sample.name.endswith("_created")
    )


def file_versions(directory: Path) -> Counter[str]:
    """How many keys of each version every slot file in ``directory`` holds."""
    found: Counter[str] = Counter()
    for path in directory.glob("*.db"):
        for key, _, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            labels = json.loads(key)[2]
            if labels.get("model") == "churn":
                found[labels["version"]] += 1
    return found


def binding_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Uses the model version named by the path (``/1``): a request the middleware counts
    under that version."""
    signals.bind_model("churn", environ["PATH_INFO"].strip("/"))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def test_registering_beyond_live_versions_retires_the_oldest(
    mode: Path | None, profile: ReferenceProfile, call: Any
) -> None:
    """Every series of version 1 goes (model series, its held-out accuracy, its request series,
    and in multiprocess mode its keys in the files); its predictions and feedback are refused,
    the feedback counted under its own reason. Versions 2 and 3 are untouched."""
    with isolated_signals() as registry:
        app = MetricsMiddleware(binding_app, registry=registry, route_resolver=lambda e: "/m")
        signals.register_model(versioned(profile, "1"))
        ids = signals.record_prediction(
            {"delta": [1.0, 2.0]}, scores=[0.9, 0.2], classes=["Yes", "No"]
        ).ids
        assert call(app, "/1").code == 200
        per_version = scraped_by_version(registry)["1"]
        keys = file_versions(mode)["1"] if mode is not None else 0
        signals.register_model(versioned(profile, "2"))
        assert call(app, "/2").code == 200
        assert scraped_by_version(registry) == {"1": per_version, "2": per_version}

        signals.register_model(versioned(profile, "3"))  # live_versions=2: 1 retires
        assert signals.registered_models() == [("churn", "2"), ("churn", "3")]
        assert scraped_by_version(registry) == {"2": per_version, "3": per_version - 1}
        if mode is not None:  # gone from the files too, not only from the scrapes
            assert file_versions(mode) == {"2": keys, "3": keys - 1}
        with pytest.raises(ValueError, match="'1' is retired"):
            signals.record_prediction({"delta": 1.0}, model="churn", version="1")
        for prediction_id in ids:
            with pytest.raises(InvalidPredictionId) as raised:
                signals.record_feedback(prediction_id, "Yes")
            assert raised.value.reason == "retired"
        scraped = scrape_registry(registry)
        assert scraped.get_sample_value("model_feedback_rejected_total", {"reason": "retired"}) == 2
        for version in ("2", "3"):
            accuracy = {"model": "churn", "version": version}
            assert scraped.get_sample_value("model_reference_accuracy", accuracy) == 0.8
        signals.record_prediction({"delta": 1.0}, model="churn", version="2", classes="No")
        scraped = scrape_registry(registry)
        labels = {"model": "churn", "version": "2", "class": "No"}
        assert scraped.get_sample_value("model_predictions_total", labels) == 1


@pytest.mark.parametrize("setting", [0, -1, True, 1.5, "2"])
def test_live_versions_must_be_a_positive_integer(setting: Any) -> None:
    with pytest.raises(ValueError, match="live_versions"):
        signals.configure(registry=CollectorRegistry(), live_versions=setting)


def test_live_versions_from_the_environment(
    profile: ReferenceProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(signals.LIVE_VERSIONS_ENV, "three")
    with pytest.raises(ValueError, match="live_versions"):
        signals.configure(registry=CollectorRegistry())
    monkeypatch.setenv(signals.LIVE_VERSIONS_ENV, "1")
    with isolated_signals():
        assert signals.live_versions() == 1
        signals.register_model(versioned(profile, "3"))
        signals.register_model(versioned(profile, "4"))
        assert signals.registered_models() == [("churn", "4")]
    with isolated_signals(live_versions=3):  # the keyword wins
        assert signals.live_versions() == 3


def test_versions_are_ordered_alike_in_every_process() -> None:
    versions = ["10", "9", "1.10", "1.9", "2024-12-01", "2024-05-01", "v2", "v10", "1.9.1"]
    assert sorted(versions, key=version_key) == [
        "1.9",
        "1.9.1",
        "1.10",
        "9",
        "10",
        "2024-05-01",
        "2024-12-01",
        "v2",
        "v10",
    ]


def test_newer_means_the_version_order_not_the_registration_order(
    profile: ReferenceProfile,
) -> None:
    with isolated_signals(live_versions=2):
        for version in ("10", "9"):
            signals.register_model(versioned(profile, version))
        signals.register_model(versioned(profile, "11"))  # retires 9, registered last
        assert signals.registered_models() == [("churn", "10"), ("churn", "11")]
        for older in ("9", "8"):  # 8 was never registered: older than the live ones all the same
            with pytest.raises(ValueError, match="is retired"):
                signals.register_model(versioned(profile, older))
        assert signals.registered_models() == [("churn", "10"), ("churn", "11")]


def test_retire_model_retires_one_version(mode: Path | None, profile: ReferenceProfile) -> None:
    with isolated_signals() as registry:
        signals.register_model(versioned(profile, "2"))
        signals.register_model(versioned(profile, "3"))
        token = signals.record_prediction({"delta": 1.0}, model="churn", version="3").id
        signals.retire_model("churn", "3")  # a bad release, withdrawn
        assert signals.registered_models() == [("churn", "2")]
        assert set(scraped_by_version(registry)) == {"2"}
        with pytest.raises(InvalidPredictionId, match="retired"):
            signals.record_feedback(token, "No")
        with pytest.raises(ValueError, match="retired"):
            signals.register_model(versioned(profile, "3"))
        signals.register_model(versioned(profile, "4"))
        assert signals.registered_models() == [("churn", "2"), ("churn", "4")]


RETIRING_SCRIPT = """
import sys
from ml_wsgi_metrics import multiprocess
multiprocess.activate(sys.argv[1])
multiprocess.use_identifier(sys.argv[2])
from prometheus_client import CollectorRegistry
from ml_wsgi_metrics import signals
from ml_wsgi_metrics.profile import ReferenceProfile
signals.configure(registry=CollectorRegistry(), secret_key=sys.argv[3])
profile = ReferenceProfile.load(sys.argv[4])
for version in sys.argv[5:]:
    signals.register_model(ReferenceProfile.from_dict({**profile.to_dict(), "version": version}))
print(signals.registered_models())
"""


def run_worker(directory: Path, identifier: str, profile_file: Path, *versions: str) -> str:
    """Another process (worker ``identifier``) registers ``versions``; what it registered."""
    arguments = [str(directory), identifier, TEST_SECRET_KEY, str(profile_file), *versions]
    done = subprocess.run(
        [sys.executable, "-c", RETIRING_SCRIPT, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_a_version_another_process_retires_leaves_every_scrape_and_this_process(
    multiprocess_dir: Path,
    profile: ReferenceProfile,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    profile_file = tmp_path / "profile.json"
    profile.save(profile_file)
    with isolated_signals() as registry:
        signals.register_model(versioned(profile, "1"))
        signals.register_model(versioned(profile, "2"))
        token = signals.record_prediction({"delta": 1.0}, model="churn", version="1").id
        per_version = scraped_by_version(registry)["1"]
        # Another worker registers version 3: version 1 retires there, and in the record.
        assert run_worker(multiprocess_dir, "w1", profile_file, "2", "3") == (
            "[('churn', '2'), ('churn', '3')]"
        )
        # Every scrape drops it at once, this process's files still hold it...
        assert scraped_by_version(registry) == {"2": per_version, "3": per_version}
        assert (
            merged(multiprocess_dir).get_sample_value(
                "model_predictions_total", {**MODEL, "version": "1", "class": NO_CLASS}
            )
            == 1
        )
        # ...until this process next reads the record (at most a second later, when it uses
        # the verbs; at once here).
        monkeypatch.setattr(_config, "_SYNC_INTERVAL", 0.0)
        assert signals.registered_models() == [("churn", "2")]
        assert set(file_versions(multiprocess_dir)) == {"2", "3"}
        with pytest.raises(ValueError, match="retired"):
            signals.record_prediction({"delta": 1.0}, model="churn", version="1")
        with pytest.raises(InvalidPredictionId, match="retired"):
            signals.record_feedback(token, "No")


def test_a_successor_drops_retired_series_from_the_files_it_takes_over(
    multiprocess_dir: Path, profile: ReferenceProfile, tmp_path: Path
) -> None:
    profile_file = tmp_path / "profile.json"
    profile.save(profile_file)
    with isolated_signals():
        multiprocess.use_identifier("w5")
        for version in ("1", "2"):
            signals.register_model(versioned(profile, version))
            signals.record_prediction({"delta": [1.0, 2.0]}, model="churn", version=version)
        multiprocess.use_identifier(None)  # the holder of slot w5 is gone
    _retired.update(str(multiprocess_dir), lambda record: record.retire_below("churn", "2"))
    assert file_versions(multiprocess_dir)["1"] > 0  # left in the dead holder's files
    run_worker(multiprocess_dir, "w5", profile_file, "2")  # its successor
    assert set(file_versions(multiprocess_dir)) == {"2"}
    predictions = {**MODEL, "version": "2", "class": NO_CLASS}
    assert merged(multiprocess_dir).get_sample_value("model_predictions_total", predictions) == 2


def test_the_record_is_private_and_never_read_through_a_link(
    multiprocess_dir: Path, profile: ReferenceProfile, tmp_path: Path
) -> None:
    directory = str(multiprocess_dir)
    record = multiprocess_dir / _retired.RECORD
    _retired.update(directory, lambda r: r.retire("churn", "1"))
    assert record.stat().st_mode & 0o777 == 0o600
    assert _retired.read(directory).is_retired("churn", "1")
    record.unlink()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    record.symlink_to(elsewhere)
    with pytest.raises(OSError):
        _retired.update(directory, lambda r: r.retire("churn", "1"))
    assert elsewhere.read_text() == "{}"
    record.unlink()
    os.mkfifo(record)
    with pytest.raises(OSError, match="not a regular file"):
        _retired.read(directory)  # refused at once, not a wait for a writer
    # The verbs fail open: the version retires in this process all the same, counted.
    errors = multiprocess.instrumentation_errors()
    with isolated_signals():
        signals.register_model(versioned(profile, "1"))
        signals.retire_model("churn", "1")
        assert signals.registered_models() == []
    assert multiprocess.instrumentation_errors() > errors


FALLBACK_SCRIPT = """
import sys
from prometheus_client import CollectorRegistry
from ml_wsgi_metrics import signals
from ml_wsgi_metrics.exposition import scrape_registry
from ml_wsgi_metrics.profile import ReferenceProfile
signals.configure(registry=CollectorRegistry(), secret_key="k")
profile = ReferenceProfile.load(sys.argv[1])
for version in ("1", "2", "3"):
    signals.register_model(ReferenceProfile.from_dict({**profile.to_dict(), "version": version}))
scraped = scrape_registry(CollectorRegistry())
print(sorted({s.labels["version"] for m in scraped.collect() for s in m.samples
              if s.labels.get("model") == "churn"}))
"""


def test_without_the_hooks_retired_versions_leave_the_scrapes_too(
    profile: ReferenceProfile, tmp_path: Path
) -> None:
    """prometheus_client's own files (``PROMETHEUS_MULTIPROC_DIR`` set, no hooks) keep every
    key for ever; the record in that directory hides the retired versions from the scrapes."""
    directory = tmp_path / "fallback"
    directory.mkdir(mode=0o700)
    profile_file = tmp_path / "profile.json"
    profile.save(profile_file)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ML_WSGI_METRICS_")}
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(profile_file)],
        env={**environment, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "['2', '3']"
    assert _retired.read(str(directory)).is_retired("churn", "1")
    assert file_versions(directory)["1"] > 0  # still in prometheus_client's file: hidden only
