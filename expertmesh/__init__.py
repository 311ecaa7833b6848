"""ExpertMesh: serving Collaboration-of-Experts models on Ray."""

__version__ = "0.1.0"
