"""Trainers for the tiny shipped models and writers of tiny random-weight models in the real file layouts.

A trainer started as a program (`python -m kineflow.training.train ...`) owns its process, and often shares the
machine with other work: OpenMP threads waiting at a barrier must then sleep rather than spin, or a 2-thread run on a
machine with one busy core slows ~16x (training/README.md). So, before anything here imports torch, OpenMP waits
passively unless the user set OMP_WAIT_POLICY, as the kineflow command does (runtime/cpu.py). A program that
imported torch first keeps its own setting (OpenMP read it already).
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
