"""Calibration text: sources, sampling, tokenization (installed as quantizer.calibration)."""
