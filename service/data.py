"""Customer-churn data: a seeded generator with the Telco schema, a CSV loader, preprocessing.

No download is possible where this service is built and tested, so :func:`generate` makes a
table with exactly the columns and dtypes of the public IBM Telco customer-churn CSV as
``pandas.read_csv`` returns it (``TotalCharges`` is a string column, blank for customers
with zero tenure), with the real data's marginals and the relations between columns that
make churn learnable: month-to-month contracts, fiber, electronic checks, short tenure and
high charges churn more; monthly charges are the sum of the services taken.
:func:`load_data` reads a user's CSV of the same schema instead.
"""

from __future__ import annotations

import os
from typing import Final

import numpy as np
import pandas as pd

__all__ = [
    "CATEGORIES",
    "COLUMNS",
    "DEFAULT_ROWS",
    "DEFAULT_SEED",
    "SCHEMA",
    "TARGET",
    "generate",
    "load_data",
    "preprocess",
]

DEFAULT_ROWS: Final = 7043
DEFAULT_SEED: Final = 42
TARGET: Final = "Churn"

#: Column -> dtype, in the order of the public CSV (string columns use pandas' ``str`` dtype).
SCHEMA: Final[dict[str, str]] = {
    "customerID": "str",
    "gender": "str",
    "SeniorCitizen": "int64",
    "Partner": "str",
    "Dependents": "str",
    "tenure": "int64",
    "PhoneService": "str",
    "MultipleLines": "str",
    "InternetService": "str",
    "OnlineSecurity": "str",
    "OnlineBackup": "str",
    "DeviceProtection": "str",
    "TechSupport": "str",
    "StreamingTV": "str",
    "StreamingMovies": "str",
    "Contract": "str",
    "PaperlessBilling": "str",
    "PaymentMethod": "str",
    "MonthlyCharges": "float64",
    "TotalCharges": "str",
    "Churn": "str",
}
COLUMNS: Final = tuple(SCHEMA)

_YES_NO = ("No", "Yes")
_NO_INTERNET = "No internet service"
_ADDONS = (
    "OnlineSecurity",
    "OnlineBackup",
    "DeviceProtection",
    "TechSupport",
    "StreamingTV",
    "StreamingMovies",
)
_CONTRACTS = ("Month-to-month", "One year", "Two year")
_PAYMENTS = (
    "Electronic check",
    "Mailed check",
    "Bank transfer (automatic)",
    "Credit card (automatic)",
)

#: The values each categorical column takes in the public data.
CATEGORIES: Final[dict[str, tuple[str, ...]]] = {
    "gender": ("Female", "Male"),
    "Partner": _YES_NO,
    "Dependents": _YES_NO,
    "PhoneService": _YES_NO,
    "MultipleLines": ("No", "Yes", "No phone service"),
    "InternetService": ("DSL", "Fiber optic", "No"),
    **{name: ("No", "Yes", _NO_INTERNET) for name in _ADDONS},
    "Contract": _CONTRACTS,
    "PaperlessBilling": _YES_NO,
    "PaymentMethod": _PAYMENTS,
    "Churn": _YES_NO,
}

# Monthly price of each service (USD); with the noise below the range is 18.25-118.75.
_PRICE_PHONE = 20.0
_PRICE_EXTRA_LINES = 5.0
_PRICE_INTERNET = {"DSL": 25.0, "Fiber optic": 50.0}
_PRICE_ADDON = {
    "OnlineSecurity": 5.0,
    "OnlineBackup": 5.0,
    "DeviceProtection": 5.0,
    "TechSupport": 5.0,
    "StreamingTV": 10.0,
    "StreamingMovies": 10.0,
}
_MIN_CHARGE, _MAX_CHARGE = 18.25, 118.75
_CHURN_RATE = 0.265
# Share of zero-tenure customers (blank TotalCharges): 11 of 7,043 in the public data.
_ZERO_TENURE_SHARE = 11 / 7043


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _choice(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """Draw one category index per row from a ``(rows, k)`` matrix of probabilities."""
    cumulative = np.cumsum(probs, axis=1)
    cumulative /= cumulative[:, -1:]
    u = rng.random(len(probs))
    return np.minimum((u[:, None] >= cumulative).sum(axis=1), probs.shape[1] - 1)


def _yes_no(flags: np.ndarray) -> np.ndarray:
    return np.where(flags, "Yes", "No")


def _customer_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unique IDs shaped like the real ones: four digits, a dash, five capitals (``7590-VHVEG``)."""
    ids = np.empty(0, dtype="<U10")
    while len(ids) < n:
        need = n - len(ids)
        codes = np.empty((need, 10), dtype=np.uint8)
        codes[:, :4] = rng.integers(ord("0"), ord("9") + 1, size=(need, 4))
        codes[:, 4] = ord("-")
        codes[:, 5:] = rng.integers(ord("A"), ord("Z") + 1, size=(need, 5))
        fresh = codes.view("S10").ravel().astype("<U10")
        ids = pd.unique(np.concatenate([ids, fresh]))
    return ids[:n]


def _tenure(rng: np.random.Generator, contract: np.ndarray) -> np.ndarray:
    """Months with the company: short and spiky at 1 for month-to-month, long for two-year."""
    n = len(contract)
    monthly = 1 + rng.exponential(17.0, n)
    monthly = np.where(rng.random(n) < 0.15, 1.0, monthly)
    one_year = 1 + 71 * rng.beta(1.6, 1.1, n)
    two_year = 1 + 71 * rng.beta(2.5, 0.8, n)
    two_year = np.where(rng.random(n) < 0.15, 72.0, two_year)
    months = np.choose(contract, [monthly, one_year, two_year])
    tenure = np.clip(np.rint(months), 1, 72).astype(np.int64)
    # New sign-ups not billed yet: tenure 0 (and a blank TotalCharges), all on contracts.
    on_contract = np.flatnonzero(contract > 0)
    zero = min(len(on_contract), max(1, round(n * _ZERO_TENURE_SHARE)))
    tenure[rng.choice(on_contract, size=zero, replace=False)] = 0
    return tenure


def _calibrated_intercept(logit: np.ndarray, rate: float) -> float:
    """The intercept that makes the mean churn probability equal ``rate`` (bisection)."""
    low, high = -20.0, 20.0
    for _ in range(60):
        mid = (low + high) / 2
        if _sigmoid(logit + mid).mean() < rate:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def generate(n_rows: int = DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> pd.DataFrame:
    """A synthetic churn table with the Telco schema; the same ``seed`` gives the same frame.

    Each step below draws from ``rng`` in turn (the order is part of the seed's contract).
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be at least 1, got {n_rows}")
    rng = np.random.default_rng(seed)
    draws = _people(rng, n_rows)
    draws |= _contract(rng, draws)
    draws |= _services(rng, draws)
    draws |= _billing(rng, draws)
    draws["churn"] = _churn(rng, draws)
    return _frame(rng, draws)


#: Arrays of one generated table, one value per customer, by name.
_Draws = dict[str, np.ndarray]


def _people(rng: np.random.Generator, n: int) -> _Draws:
    """Gender, seniors, partners and dependents."""
    male = rng.random(n) < 0.505
    senior = rng.random(n) < 0.162
    partner = rng.random(n) < 0.483
    dependents = rng.random(n) < np.where(partner, 0.53, 0.10) * np.where(senior, 0.5, 1.0)
    return {"male": male, "senior": senior, "partner": partner, "dependents": dependents}


def _contract(rng: np.random.Generator, draws: _Draws) -> _Draws:
    """Contract (0 month-to-month, 1 one year, 2 two year) and tenure: contract from a latent
    loyalty score, families sign longer contracts, seniors shorter."""
    n = len(draws["senior"])
    loyalty = (
        0.6 * draws["partner"]
        + 0.4 * draws["dependents"]
        - 0.4 * draws["senior"]
        + rng.normal(0.0, 1.0, n)
    )
    cuts = np.quantile(loyalty, [0.55, 0.76])
    contract = np.searchsorted(cuts, loyalty, side="right")
    return {"contract": contract, "tenure": _tenure(rng, contract)}


def _services(rng: np.random.Generator, draws: _Draws) -> _Draws:
    """Phone lines, internet (0 DSL, 1 fiber, 2 none) and the add-ons."""
    contract, tenure, senior = draws["contract"], draws["tenure"], draws["senior"]
    n = len(tenure)
    phone = rng.random(n) < 0.903
    extra_lines = phone & (rng.random(n) < 0.28 + 0.4 * tenure / 72)

    # Internet: customers without phone service all have DSL (as in the public data);
    # seniors favour fiber, two-year contracts are often phone-only.
    scores = np.column_stack(
        [
            np.zeros(n),  # DSL
            0.42 + 1.2 * senior,  # fiber
            -0.2 - 1.0 * senior + 0.8 * (contract == 2),  # no internet
        ]
    )
    weights = np.exp(scores)
    weights[~phone] = (1.0, 0.0, 0.0)
    internet = _choice(rng, weights)
    fiber, has_internet = internet == 1, internet != 2

    # Add-ons share a per-customer engagement factor and grow with tenure; fiber customers
    # stream more and buy less security and support.
    engagement = rng.normal(0.0, 0.8, n)
    addon_base = {
        "OnlineSecurity": (-0.25, -0.9),
        "OnlineBackup": (-0.2, 0.0),
        "DeviceProtection": (-0.35, 0.2),
        "TechSupport": (-0.25, -0.9),
        "StreamingTV": (-0.6, 0.9),
        "StreamingMovies": (-0.6, 0.95),
    }
    services = {"phone": phone, "extra_lines": extra_lines, "internet": internet}
    services |= {"fiber": fiber, "has_internet": has_internet}
    for name, (base, fiber_shift) in addon_base.items():
        p = _sigmoid(base + fiber_shift * fiber + 2.0 * (tenure / 72 - 0.45) + engagement)
        services[name] = has_internet & (rng.random(n) < p)
    return services


def _billing(rng: np.random.Generator, draws: _Draws) -> _Draws:
    """Paperless billing, payment method, monthly charges and the total (text, as in the CSV)."""
    contract, tenure = draws["contract"], draws["tenure"]
    n, fiber, has_internet = len(tenure), draws["fiber"], draws["has_internet"]
    paperless = rng.random(n) < 0.50 + 0.22 * fiber - 0.25 * ~has_internet + 0.05 * draws["senior"]
    payment_probs = np.array(
        [
            [0.49, 0.22, 0.15, 0.14],  # month-to-month
            [0.18, 0.22, 0.30, 0.30],  # one year
            [0.08, 0.27, 0.33, 0.32],  # two year
        ]
    )[contract]
    payment_probs[~has_internet] *= (0.7, 1.5, 1.0, 1.0)  # phone-only customers mail checks
    payment = _choice(rng, payment_probs)

    internet = draws["internet"]
    charges = (
        _PRICE_PHONE * draws["phone"]
        + _PRICE_EXTRA_LINES * draws["extra_lines"]
        + np.select([internet == 0, internet == 1], list(_PRICE_INTERNET.values()), 0.0)
        + sum(_PRICE_ADDON[name] * draws[name] for name in _ADDONS)
        + rng.uniform(-1.75, 3.75, n)
    )
    monthly = np.round(np.clip(np.round(charges * 20) / 20, _MIN_CHARGE, _MAX_CHARGE), 2)
    # Price changes over the years make the total drift from tenure * monthly charge.
    drift = 1 + rng.normal(0.0, 0.05, n) * (tenure > 1)
    total = np.round(np.round(tenure * monthly * np.clip(drift, 0.85, 1.15) * 20) / 20, 2)
    total_text = pd.Series(total).astype(str).where(tenure > 0, " ").to_numpy()
    return {"paperless": paperless, "payment": payment, "monthly": monthly, "total": total_text}


def _churn(rng: np.random.Generator, draws: _Draws) -> np.ndarray:
    """Who churns: a logistic model of the columns plus noise, calibrated to the churn rate."""
    tenure = draws["tenure"]
    logit = (
        np.array([0.0, -1.0, -2.0])[draws["contract"]]
        - 0.6 * (np.log1p(tenure) - 3.0)
        + 0.9 * draws["fiber"]
        - 0.5 * ~draws["has_internet"]
        + 0.6 * (draws["payment"] == 0)
        + 0.35 * draws["paperless"]
        + 0.3 * draws["senior"]
        - 0.4 * draws["OnlineSecurity"]
        - 0.4 * draws["TechSupport"]
        + 0.15 * draws["StreamingTV"]
        + 0.15 * draws["StreamingMovies"]
        - 0.15 * draws["partner"]
        - 0.15 * draws["dependents"]
        + 0.012 * (draws["monthly"] - 65.0)
        + rng.normal(0.0, 0.8, len(tenure))  # what no column records (quality, competitors...)
    )
    churn_p = _sigmoid(logit + _calibrated_intercept(logit, _CHURN_RATE))
    return np.asarray(rng.random(len(tenure)) < churn_p)


def _frame(rng: np.random.Generator, draws: _Draws) -> pd.DataFrame:
    """The table, in the CSV's columns and encodings."""
    phone, has_internet = draws["phone"], draws["has_internet"]
    columns: dict[str, object] = {
        "customerID": _customer_ids(rng, len(draws["tenure"])),
        "gender": np.where(draws["male"], "Male", "Female"),
        "SeniorCitizen": draws["senior"].astype(np.int64),
        "Partner": _yes_no(draws["partner"]),
        "Dependents": _yes_no(draws["dependents"]),
        "tenure": draws["tenure"],
        "PhoneService": _yes_no(phone),
        "MultipleLines": np.where(phone, _yes_no(draws["extra_lines"]), "No phone service"),
        "InternetService": np.asarray(CATEGORIES["InternetService"])[draws["internet"]],
        **{name: np.where(has_internet, _yes_no(draws[name]), _NO_INTERNET) for name in _ADDONS},
        "Contract": np.asarray(_CONTRACTS)[draws["contract"]],
        "PaperlessBilling": _yes_no(draws["paperless"]),
        "PaymentMethod": np.asarray(_PAYMENTS)[draws["payment"]],
        "MonthlyCharges": draws["monthly"],
        "TotalCharges": draws["total"],
        "Churn": _yes_no(draws["churn"]),
    }
    return pd.DataFrame(columns).astype(SCHEMA)


def _numeric_column(frame: pd.DataFrame, name: str, *, integer: bool) -> pd.Series:
    values = pd.to_numeric(frame[name].str.strip(), errors="coerce")
    bad = values.isna() | (values % 1 != 0 if integer else False)
    if bad.any():
        example = frame[name][bad].iloc[0]
        kind = "an integer" if integer else "a number"
        raise ValueError(
            f"column {name!r}: {int(bad.sum())} value(s) are not {kind} (first: {example!r})"
        )
    return values.astype("int64" if integer else "float64")


def load_data(
    path: str | os.PathLike[str] | None = None,
    *,
    n_rows: int = DEFAULT_ROWS,
    seed: int = DEFAULT_SEED,
) -> pd.DataFrame:
    """The generated table, or a user's CSV of the same schema when ``path`` is given.

    A CSV must have every column of :data:`SCHEMA` (extra columns are dropped; the result has
    the schema's columns, order and dtypes). ``TotalCharges`` stays text, as in the raw data.
    Raises ValueError naming missing columns or a numeric column with unparseable values.
    """
    if path is None:
        return generate(n_rows, seed)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [name for name in COLUMNS if name not in raw.columns]
    if missing:
        raise ValueError(f"{os.fspath(path)}: missing column(s): {', '.join(missing)}")
    frame = raw[list(COLUMNS)].copy()
    frame["SeniorCitizen"] = _numeric_column(frame, "SeniorCitizen", integer=True)
    frame["tenure"] = _numeric_column(frame, "tenure", integer=True)
    frame["MonthlyCharges"] = _numeric_column(frame, "MonthlyCharges", integer=False)
    return frame.astype(SCHEMA)


def preprocess(frame: pd.DataFrame) -> pd.DataFrame:
    """Clean a raw frame as the real data needs; returns a new frame.

    - ``TotalCharges`` becomes float. Blank or unparseable values (the real data's ``" "`` for
      customers with zero tenure) are *filled*, not dropped, with ``tenure * MonthlyCharges``:
      0.0 for new customers, who have not been billed yet, so they can still be scored.
    - ``Churn``, when present, becomes 0/1 (``"Yes"`` -> 1); any other value is a ValueError.
    """
    out = frame.copy()
    if "TotalCharges" in out.columns:
        total = out["TotalCharges"]
        if not pd.api.types.is_numeric_dtype(total):
            total = total.astype(str).str.strip()
        total = pd.to_numeric(total, errors="coerce").astype("float64")
        if total.isna().any():
            estimate = out["tenure"].astype("float64") * out["MonthlyCharges"].astype("float64")
            total = total.fillna(estimate)
        out["TotalCharges"] = total
    if TARGET in out.columns and not pd.api.types.is_integer_dtype(out[TARGET]):
        labels = out[TARGET].astype(str).str.strip()
        unknown = sorted(set(labels.unique()) - set(_YES_NO))
        if unknown:
            raise ValueError(f"column {TARGET!r}: expected 'Yes' or 'No', got {unknown[:5]}")
        out[TARGET] = (labels == "Yes").astype("int64")
    return out
