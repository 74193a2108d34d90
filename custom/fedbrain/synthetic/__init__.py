"""Synthetic multi-hospital cohorts for demos, tests and benchmarks (never hospital data)."""
