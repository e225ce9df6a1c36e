"""Comparing many runs: `compare_runs` writes one self-contained page for run directories, a
directory of them, or a study (`cnnjax compare`): the runs ranked by their monitor with the
settings that differ, each config against the best, overlaid learning curves, calibration of each
run and of an ensemble of the best, and for a study its optimization history, parameter
importances, parallel coordinates and slices. Combining runs into one model is
`cnnjax.training.ensemble`'s."""

from cnnjax.compare.page import compare_runs

__all__ = ["compare_runs"]
