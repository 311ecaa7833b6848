"""One Ray Serve deployment per expert: loads its checkpoint once, classifies dynamically batched images.

Glue only: the model, preprocessing and tier moves are `ExpertRuntime`'s. Batch size and wait come
from `user_config` (the spec's max_batch, later the profile), so they change without a restart.
Every result names the node and replica that produced it, for the request's trace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray import serve

from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.experts.runtime import ExpertRuntime
from expertmesh.experts.spec import load_spec, resolve_checkpoint

logger = logging.getLogger("ray.serve")


@serve.deployment
class ExpertDeployment:
    def __init__(self, spec_path: str | None, expert: str, zoo_root: str) -> None:
        torch.set_num_threads(1)
        spec = load_spec(spec_path)
        self.spec = spec.expert(expert)
        self.runtime = ExpertRuntime(self.spec, resolve_checkpoint(self.spec, Path(zoo_root)), image_limits=spec.image)
        self.load_moves = self.runtime.load()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        logger.info("expert %s loaded in %.3f s (%d bytes) on node %s", expert,
                    sum(m.seconds for m in self.load_moves), self.runtime.footprint_bytes, self.node_id)

    def reconfigure(self, user_config: dict) -> None:
        self.classify.set_max_batch_size(int(user_config.get("max_batch_size", self.spec.max_batch)))
        self.classify.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify(self, images: list[np.ndarray]) -> list[dict]:
        """RGB uint8 images [H, W, 3] -> one result dict per image."""
        t0 = time.perf_counter()
        preds = await asyncio.to_thread(self._infer, images)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        return [{"label": p.label, "score": p.score, "latency_ms": latency_ms, "batch_size": len(images),
                 "node_id": self.node_id, "replica_id": self.replica_id} for p in preds]

    def _infer(self, images: list[np.ndarray]):
        return self.runtime.infer(to_pixel_values(images, self.spec.input_size_px))

    def info(self) -> dict:
        return {"expert": self.spec.name, "node_id": self.node_id, "replica_id": self.replica_id,
                "footprint_bytes": self.runtime.footprint_bytes, "tier": self.runtime.tier.value,
                "load_s": sum(m.seconds for m in self.load_moves)}
