"""Fixtures of the service tests: one training per session, copied into each test's models dir.

Every app gets a fresh registry and the test secret key; the model signals are reset after it.
Every app is given the test tokens (``CHURN_FEEDBACK_TOKEN``, ``CHURN_ADMIN_TOKEN``) and its
test client presents them, as the service's back office and administrator would: the tests
of refused requests (``test_security.py``) build their own client or header.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry
from support import SERVICE_TOKENS, BackOfficeClient

from ml_wsgi_metrics.testing import TEST_SECRET_KEY, reset_signals
from service.app import create_app
from service.data import TARGET, generate
from service.pipeline import train


@pytest.fixture(autouse=True)
def back_office(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's tokens in the environment; test clients present them."""
    for name, token in SERVICE_TOKENS.items():
        monkeypatch.setenv(name, token)
    monkeypatch.setattr(Flask, "test_client_class", BackOfficeClient)


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding version 1 of the default model (read-only: copy it)."""
    models = tmp_path_factory.mktemp("trained")
    train(models_dir=models)
    return models


@pytest.fixture(scope="session")
def raw_rows() -> list[dict[str, Any]]:
    """Valid request rows, as a client sends them: the CSV's raw form, no label."""
    frame = generate(40, seed=7).drop(columns=[TARGET])
    return json.loads(frame.to_json(orient="records"))


def copy_models(trained: Path, directory: Path) -> Path:
    """A writable copy of the trained models directory."""
    return Path(shutil.copytree(trained, directory / "models"))


@pytest.fixture
def models_dir(trained_models: Path, tmp_path: Path) -> Path:
    return copy_models(trained_models, tmp_path)


AppFactory = Callable[..., Flask]


@pytest.fixture
def make_app(models_dir: Path, registry: CollectorRegistry) -> Iterator[AppFactory]:
    """Build service instances (default: this test's models dir and registry, the test key);
    the model signals are reset after the test."""

    def make(
        directory: Path | None = None, registry_: CollectorRegistry | None = None, **settings: Any
    ) -> Flask:
        app = create_app(
            directory if directory is not None else models_dir,
            registry=registry_ if registry_ is not None else registry,
            secret_key=TEST_SECRET_KEY,
            **settings,
        )
        app.testing = True
        return app

    yield make
    reset_signals()


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
