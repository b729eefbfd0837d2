"""The Django adapter names ``resolver_match.route`` through a real Django URL resolver."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import django
import pytest
from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler
from django.http import Http404, HttpRequest, HttpResponse
from django.test.utils import override_settings
from django.urls import include, path, re_path
from django.views.decorators.http import require_GET

from ml_wsgi_metrics.routes import REQUEST_KEY, install_adapter
from ml_wsgi_metrics.routes import django as django_adapter

ADAPTER = "django"
ITEM_ROUTE = "/items/<int:pk>"
URLCONF = "_ml_wsgi_metrics_test_django_urls"

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="test",
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=[],
        DATABASES={},
        ROOT_URLCONF=URLCONF,
        MIDDLEWARE=[],
    )
django.setup()


def ok(request: HttpRequest, **kwargs: Any) -> HttpResponse:
    return HttpResponse(b"ok")


@require_GET
def item(request: HttpRequest, pk: int) -> HttpResponse:
    return HttpResponse(str(pk).encode())


def seen(request: HttpRequest, pk: int) -> HttpResponse:
    """Answers with the routes named so far: naming must precede the view."""
    return HttpResponse(",".join(request.META[REQUEST_KEY].routes).encode())


def missing(request: HttpRequest, pk: int) -> HttpResponse:
    raise Http404("no such item")


class DenyMiddleware:
    """A view middleware that answers before the view for ``/denied``."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_view(self, request: HttpRequest, view: Any, args: Any, kwargs: Any) -> Any:
        return HttpResponse(status=403) if request.path_info == "/denied" else None


api_patterns = [path("models/<slug:name>/predict", ok)]

urls = types.ModuleType(URLCONF)
urls.DenyMiddleware = DenyMiddleware  # type: ignore[attr-defined]
urls.urlpatterns = [  # type: ignore[attr-defined]
    path("health", ok),
    path("denied", ok),
    path("items/<int:pk>", item),
    path("missing/<int:pk>", missing),
    path("seen/<int:pk>", seen),
    path("api/v1/", include(api_patterns)),
    re_path(r"^legacy/(?P<pk>[0-9]+)/$", ok),
]
sys.modules[URLCONF] = urls


@pytest.fixture
def app() -> Iterator[WSGIHandler]:
    """A real WSGIHandler, with our URLconf whoever configured Django first."""
    with override_settings(ROOT_URLCONF=URLCONF, MIDDLEWARE=[f"{URLCONF}.DenyMiddleware"]):
        handler = WSGIHandler()
        django_adapter.install(handler)
        yield handler


@pytest.mark.parametrize(
    ("path", "method", "status", "route"),
    [
        pytest.param("/health", "GET", 200, "/health", id="static"),
        pytest.param("/items/7", "GET", 200, "/items/<int:pk>", id="param"),
        pytest.param("/api/v1/models/churn/predict", "GET", 200,
                     "/api/v1/models/<slug:name>/predict", id="include"),
        pytest.param("/legacy/12/", "GET", 200, r"/^legacy/(?P<pk>[0-9]+)/$", id="re_path"),
        pytest.param("/items/7", "POST", 405, "/items/<int:pk>", id="405-view-decides"),
        pytest.param("/missing/3", "GET", 404, "/missing/<int:pk>", id="404-from-view"),
        pytest.param("/denied", "GET", 403, "/denied", id="other-view-middleware-answers"),
    ],
)  # fmt: skip
def test_matched_route_is_named(
    checks: Any, path: str, method: str, status: int, route: str
) -> None:
    checks.named(path, method, status, route)


def test_ids_share_one_template(checks: Any) -> None:
    checks.ids_share_one_template()


@pytest.mark.parametrize("path", ["/nope", "/items/abc", "/items/7/"])
def test_unmatched_path_is_not_named(checks: Any, path: str) -> None:
    checks.not_named(path)


def test_route_is_named_before_the_view(app: WSGIHandler, call: Callable[..., Any]) -> None:
    assert call(app, "/seen/1").body == b"/seen/<int:pk>"


def test_script_name_prefixes_the_template(checks: Any) -> None:
    checks.script_name_prefixes_the_template()


def test_install_adapter_detects_django_and_installs_once(
    app: WSGIHandler, call: Callable[..., Any]
) -> None:
    assert django_adapter.handles(app)
    assert install_adapter(app) == "django"
    assert install_adapter(app) == "django"
    assert app._view_middleware.count(django_adapter._name_route) == 1
    assert app._view_middleware[0] is django_adapter._name_route
    assert call(app, "/items/1").routes == ["/items/<int:pk>"]


def test_handles_only_django() -> None:
    assert not django_adapter.handles(object())


def test_metrics_middleware_counts_ids_under_one_template(checks: Any) -> None:
    checks.metrics_middleware_counts_ids_under_one_template()
