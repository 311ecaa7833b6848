"""Offline profiler of experts (issue: offline profiler)."""
