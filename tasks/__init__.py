"""Thin Prefect tasks around fedhq_core, and the MLflow tracking they call."""
