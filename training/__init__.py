"""Trainers for the tiny shipped models and writers of tiny random-weight models in the real file layouts."""
