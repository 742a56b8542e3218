"""Procedural dataset, analytic judge and trainers for the tiny shipped models."""
