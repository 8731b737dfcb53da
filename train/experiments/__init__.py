"""Experiment management: sweeps, ablations, their reports and plots.

Reads what training runs wrote; the training core (the rest of `train/`) never imports it.
"""
