"""fleet: a Ray-based fleet emulator for training language models with user-level DP.

Recreates the system of Ramaswamy et al. (2020), "Training Production Language Models without
Memorizing User Data": DP-FedAvg over a heterogeneous, diurnal phone fleet, with secret uniform
sampling of the cohort and an end-to-end memorization audit.
"""

__version__ = "0.1.0"
