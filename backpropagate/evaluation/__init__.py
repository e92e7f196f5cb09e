"""Evaluation of trained runs: metrics with bootstrap intervals, the runner, and its background job.

``metrics`` is plain Python and numpy (no torch); ``runner`` loads models and generates.
"""
