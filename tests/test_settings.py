"""The environment variables: one table in ``_settings.py``, the README's copy of it, every read
going through it, and what an unset, empty or bad value gives."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ml_wsgi_metrics import _settings
from ml_wsgi_metrics._settings import SETTINGS, Setting, markdown_table
from ml_wsgi_metrics.exposition import MetricsProtection

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "ml_wsgi_metrics"
PREFIX = "ML_WSGI_METRICS_"
BEGIN = "<!-- settings table: generated from ml_wsgi_metrics/_settings.py -->\n"
END = "<!-- end of settings table -->"


def test_the_readme_table_is_the_code_table() -> None:
    readme = (REPO / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    documented = readme.split(BEGIN)[1].split(END)[0]
    assert documented == markdown_table(), (
        "README.md's settings table is stale: replace it with the output of\n"
        "  python -m ml_wsgi_metrics._settings\n" + markdown_table()
    )


def test_every_variable_mentioned_anywhere_is_in_the_table() -> None:
    sources = [*PACKAGE.rglob("*.py"), PACKAGE / "_speedups.c", REPO / "README.md"]
    sources += [REPO / "gunicorn.conf.py", REPO / "uwsgi.ini"]
    mentioned = {
        name for path in sources for name in re.findall(rf"{PREFIX}[A-Z_]*[A-Z]", path.read_text())
    }
    assert mentioned == {setting.name for setting in SETTINGS}


def _names_of_variables(tree: ast.Module) -> set[str]:
    """Module-level names bound to a variable's name: ``X = "ML_WSGI_METRICS_..."`` or
    ``X = _settings.SOMETHING.name``."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            value = ast.unparse(node.value)
            if value.strip("'\"").startswith(PREFIX) or value.startswith("_settings."):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _environment_reads(tree: ast.Module) -> list[str]:
    """What ``os.environ.get(X)``, ``os.environ[X]`` (read) and ``os.getenv(X)`` read, where
    ``X`` is an ``ML_WSGI_METRICS_*`` string or a module-level name bound to one."""
    aliases = _names_of_variables(tree)

    def variable(key: ast.expr) -> bool:
        if isinstance(key, ast.Constant):
            return isinstance(key.value, str) and key.value.startswith(PREFIX)
        return isinstance(key, ast.Name) and key.id in aliases

    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and variable(node.args[0]):
            if ast.unparse(node.func).endswith(("environ.get", "getenv")):
                reads.append(ast.unparse(node))
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)
            and ast.unparse(node.value).endswith("environ")
            and variable(node.slice)
        ):
            reads.append(ast.unparse(node))
    return sorted(reads)


def test_only_settings_reads_the_environment() -> None:
    reads = {
        str(path.relative_to(REPO)): found
        for path in PACKAGE.rglob("*.py")
        if path.name != "_settings.py"
        and (found := _environment_reads(ast.parse(path.read_text())))
    }
    assert reads == {}


def test_the_read_check_sees_reads() -> None:
    """The check above finds the forms of reading it claims to find."""
    source = "\n".join(
        [
            "import os",
            f'KEY = "{PREFIX}X"',
            "OTHER = _settings.TOKEN.name",
            f'os.environ.get("{PREFIX}A")',
            "os.environ[KEY]",
            f'os.getenv("{PREFIX}B", "")',
            "os.environ.get(OTHER)",
            'os.environ[KEY] = "written, not read"',
            'os.environ.get("HOME")',
        ]
    )
    assert _environment_reads(ast.parse(source)) == [
        f"os.environ.get('{PREFIX}A')",
        "os.environ.get(OTHER)",
        "os.environ[KEY]",
        f"os.getenv('{PREFIX}B', '')",
    ]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_unset_gives_the_default(setting: Setting[object], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(setting.name, raising=False)
    assert setting.get() == setting.default


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_empty_is_unset_unless_it_means_something(
    setting: Setting[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(setting.name, "")
    assert setting.get() == ("" if setting.keep_empty else setting.default)


@pytest.mark.parametrize(
    ("setting", "raw", "value"),
    [
        pytest.param(_settings.PORT, "9464", 9464, id="port"),
        pytest.param(_settings.LIVE_VERSIONS, " 3 ", 3, id="live-versions"),
        pytest.param(_settings.PURE_PYTHON, "0", True, id="pure-python-any-value"),
        pytest.param(_settings.ADDRESS, "0.0.0.0", "0.0.0.0", id="address"),
        pytest.param(_settings.TOKEN, " t0k3n\n", " t0k3n\n", id="token-as-set"),
    ],
)
def test_values_are_converted(
    setting: Setting[object], raw: str, value: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(setting.name, raw)
    assert setting.get() == value


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        pytest.param(
            _settings.PORT,
            "metrics_port: $ML_WSGI_METRICS_PORT is not an integer: 'ninety'",
            id="port",
        ),
        pytest.param(
            _settings.LIVE_VERSIONS,
            "live_versions: $ML_WSGI_METRICS_LIVE_VERSIONS is not an integer: 'ninety'",
            id="live-versions",
        ),
    ],
)
def test_a_bad_value_names_the_argument_and_the_variable(
    setting: Setting[object], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(setting.name, "ninety")
    with pytest.raises(ValueError) as raised:
        setting.get()
    assert str(raised.value) == message


def test_an_empty_allow_list_allows_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the table says of ``ML_WSGI_METRICS_ALLOWED_NETWORKS=""``: nobody, not everybody."""
    monkeypatch.setenv(_settings.ALLOWED_NETWORKS.name, "")
    refusal = MetricsProtection.from_settings().refusal({"REMOTE_ADDR": "127.0.0.1"})
    assert refusal is not None and refusal[0].startswith("403")
    monkeypatch.delenv(_settings.ALLOWED_NETWORKS.name)
    assert MetricsProtection.from_settings().refusal({"REMOTE_ADDR": "127.0.0.1"}) is None


def test_a_blank_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_settings.TOKEN.name, "")
    with pytest.raises(ValueError, match=r"^metrics_token: an empty token would protect nothing"):
        MetricsProtection.from_settings()
