"""The lab notebook: calibration harnesses, held-out benchmarks and helpers. Not installed."""
