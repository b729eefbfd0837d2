"""The generated churn table: determinism, the Telco schema, realistic values, CSV loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.data import CATEGORIES, COLUMNS, SCHEMA, generate, load_data, preprocess


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate()


def test_same_seed_same_frame(frame: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(generate(), frame)
    assert not generate(seed=7).equals(frame)


def test_schema_and_dtypes(frame: pd.DataFrame) -> None:
    assert tuple(frame.columns) == COLUMNS
    assert {name: str(dtype) for name, dtype in frame.dtypes.items()} == SCHEMA
    assert frame["customerID"].is_unique
    assert frame["customerID"].str.fullmatch(r"\d{4}-[A-Z]{5}").all()
    assert set(frame["SeniorCitizen"].unique()) == {0, 1}
    for name, values in CATEGORIES.items():
        assert set(frame[name].unique()) == set(values), name


def test_realistic_ranges(frame: pd.DataFrame) -> None:
    assert len(frame) == 7043
    assert abs((frame["Churn"] == "Yes").mean() - 0.265) <= 0.005  # README: about 26.5 %
    charges = frame["MonthlyCharges"]
    assert (charges.min(), charges.max()) == (18.25, 118.75)  # README: 18.25-118.75
    assert 63.0 <= charges.mean() <= 66.5
    assert 0.15 <= charges.between(18, 26).mean() <= 0.3  # the cheap no-internet spike
    assert frame["tenure"].between(0, 72).all()
    assert 28 <= frame["tenure"].mean() <= 36


def test_service_consistency(frame: pd.DataFrame) -> None:
    no_phone = frame["PhoneService"] == "No"
    assert (frame.loc[no_phone, "MultipleLines"] == "No phone service").all()
    assert (frame.loc[~no_phone, "MultipleLines"] != "No phone service").all()
    no_internet = frame["InternetService"] == "No"
    for name in ("OnlineSecurity", "TechSupport", "StreamingTV", "StreamingMovies"):
        assert (frame.loc[no_internet, name] == "No internet service").all()
        assert (frame.loc[~no_internet, name] != "No internet service").all()
    assert no_internet.any()
    # Charges follow the services taken: no-internet plans are the cheap ones.
    assert frame.loc[no_internet, "MonthlyCharges"].max() < 30
    fiber = frame["InternetService"] == "Fiber optic"
    assert frame.loc[fiber, "MonthlyCharges"].min() > 60


@pytest.mark.parametrize(
    ("column", "riskier", "safer"),
    [
        pytest.param("Contract", "Month-to-month", "Two year", id="contract"),
        pytest.param("InternetService", "Fiber optic", "DSL", id="fiber"),
        pytest.param("PaymentMethod", "Electronic check", "Mailed check", id="echeck"),
    ],
)
def test_churn_drivers(frame: pd.DataFrame, column: str, riskier: str, safer: str) -> None:
    rate = (frame["Churn"] == "Yes").groupby(frame[column]).mean()
    assert rate[riskier] > 1.5 * rate[safer]


def test_churners_are_newer_and_pay_more(frame: pd.DataFrame) -> None:
    churned = frame["Churn"] == "Yes"
    assert frame.loc[churned, "tenure"].mean() < frame.loc[~churned, "tenure"].mean() - 10
    charges = frame["MonthlyCharges"]
    assert charges[churned].mean() > charges[~churned].mean() + 5


def test_total_charges_blank_for_new_customers(frame: pd.DataFrame) -> None:
    new = frame["tenure"] == 0
    assert 1 <= new.sum() <= 30
    assert (frame.loc[new, "TotalCharges"] == " ").all()
    billed = pd.to_numeric(frame.loc[~new, "TotalCharges"])
    expected = frame.loc[~new, "tenure"] * frame.loc[~new, "MonthlyCharges"]
    assert np.allclose(billed, expected, rtol=0.2)


def test_preprocess_fills_blank_total_charges_and_encodes_churn(frame: pd.DataFrame) -> None:
    clean = preprocess(frame)
    assert clean["TotalCharges"].dtype == "float64"
    assert not clean["TotalCharges"].isna().any()
    assert (clean.loc[frame["tenure"] == 0, "TotalCharges"] == 0.0).all()
    assert len(clean) == len(frame)  # filled, not dropped
    assert clean["Churn"].dtype == "int64"
    assert clean["Churn"].tolist() == (frame["Churn"] == "Yes").astype(int).tolist()
    assert frame["TotalCharges"].dtype == "str"  # input untouched


def test_preprocess_messy_values() -> None:
    raw = generate(5, seed=1).assign(
        tenure=[0, 3, 4, 5, 6],
        MonthlyCharges=[20.0, 30.0, 40.0, 50.0, 60.0],
        TotalCharges=[" ", "", "n/a", " 12.5 ", "240"],
        Churn=[" Yes", "No", "No", "Yes", "No"],
    )
    clean = preprocess(raw)
    assert clean["TotalCharges"].tolist() == [0.0, 90.0, 160.0, 12.5, 240.0]
    assert clean["Churn"].tolist() == [1, 0, 0, 1, 0]
    assert preprocess(raw.drop(columns="Churn")).columns.tolist() == raw.columns[:-1].tolist()


def test_preprocess_rejects_unknown_labels() -> None:
    raw = generate(3).assign(Churn=["Yes", "maybe", "No"])
    with pytest.raises(ValueError, match="maybe"):
        preprocess(raw)


def test_csv_round_trip(frame: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "churn.csv"
    frame.to_csv(path, index=False)
    pd.testing.assert_frame_equal(load_data(path), frame)
    assert load_data() is not frame and load_data().equals(frame)


def test_csv_extra_columns_dropped(frame: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "churn.csv"
    frame.head(10).assign(note="x").iloc[:, ::-1].to_csv(path, index=False)
    assert tuple(load_data(path).columns) == COLUMNS


def test_csv_missing_column_is_named(frame: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "churn.csv"
    frame.head(10).drop(columns=["tenure", "Contract"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing column.*tenure, Contract"):
        load_data(path)


def test_csv_bad_number_is_named(frame: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "churn.csv"
    frame.head(3).assign(tenure=["1", "two", "3"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"'tenure'.*'two'"):
        load_data(path)
