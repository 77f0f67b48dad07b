"""Latency: the per-module lookup table timed on the target device, its end-to-end validation,
side-by-side batch-1 timing and FLOP counts."""
