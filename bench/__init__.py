"""Benchmarks, importable as `expertmesh.bench` (`expertmesh bench throughput`). The figure scripts in this folder
(figures.py and its helpers) still run as scripts: `python bench/figures.py ...`."""
