"""Reference churn-prediction service: a user of :mod:`ml_wsgi_metrics`."""
