"""Helpers shared by the test modules: stream builders, the differential checker, hypothesis budgets."""
