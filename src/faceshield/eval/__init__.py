"""Evaluation: calibration, verification, the FR-protection protocol, quality metrics and reports."""
