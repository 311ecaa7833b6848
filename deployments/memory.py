"""What memory a node offers experts, read from Ray, torch and the OS (glue for `experts.residency.memory_budget_bytes`)."""

from __future__ import annotations

import os

import ray
import torch

from expertmesh.cluster.labels import MEMORY_RESOURCE


def declared_memory_mib(node_id: str) -> float | None:
    """This node's `expertmesh_memory_mib` Ray resource (what it offers experts), None where it declares none."""
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node.get("Resources", {}).get(MEMORY_RESOURCE)
    return None


def device_memory_bytes(device: torch.device) -> int | None:
    """A GPU's total memory; None for a CPU device (its memory is the machine's)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def machine_memory_bytes() -> int:
    """The machine's physical memory (the budget's fallback where a node declares none)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
