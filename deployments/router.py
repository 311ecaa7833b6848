"""The router deployment: step 1 classifies, step 2 runs the plan through DeploymentHandles.

Decisions are `router.plan`'s (pure): the route (rules, table, fallback), which outputs trigger
which experts, and the verdict. This glue calls the experts: independent calls concurrently,
each output's triggered experts as soon as it arrives, and every call bounded by a timeout, so an
accepted request always ends in a result or an explicit error.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from expertmesh.errors import ExpertMeshError, ResourceExhausted, Unavailable
from expertmesh.experts.spec import load_spec
from expertmesh.router.plan import Call, ExpertOutput, Reason, RequestMeta, aggregate, route, triggered_calls


class ExpertCallFailed(Unavailable):
    """An expert the plan needed did not answer (it failed, or ran past its timeout)."""


@serve.deployment
class RouterDeployment:
    def __init__(self, spec_path: str | None, experts: dict[str, DeploymentHandle], expert_timeout_s: float = 30.0) -> None:
        self.spec = load_spec(spec_path)
        self.experts = experts
        self.expert_timeout_s = expert_timeout_s

    async def _call(self, call: Call, image: np.ndarray) -> dict:
        try:
            res = await asyncio.wait_for(self.experts[call.expert].classify.remote(image), self.expert_timeout_s)
        except asyncio.TimeoutError:
            raise ExpertCallFailed(f"expert {call.expert!r} did not answer within {self.expert_timeout_s} s",
                                   fix="retry later; if it persists, check the expert's replicas") from None
        except ExpertMeshError:
            raise
        except BackPressureError:
            raise ResourceExhausted(f"expert {call.expert!r} has a full queue",
                                    fix="retry later with backoff; the expert is scaling up or overloaded") from None
        except Exception as exc:  # a replica crash or an error inside the expert
            raise ExpertCallFailed(f"expert {call.expert!r} failed ({type(exc).__name__})",
                                   fix="retry later; if it persists, check the expert's logs") from None
        return {**res, "expert": call.expert, "reason": call.reason.value, "because_of": call.because_of or ""}

    async def _run(self, call: Call, image: np.ndarray, planned: set[str]) -> list[dict]:
        """Run one call, then (concurrently) everything its output triggers; results in call order."""
        res = await self._call(call, image)
        children = triggered_calls(self.spec, ExpertOutput(call.expert, res["label"], res["score"]), planned)
        nested = await asyncio.gather(*(self._run(c, image, planned) for c in children))
        return [res] + [r for group in nested for r in group]

    async def inspect(self, image: np.ndarray, meta: dict) -> dict:
        """Classify, plan, run and aggregate one decoded RGB image [H, W, 3]."""
        t0 = time.perf_counter()
        router_call = Call(self.spec.router.expert, Reason.TABLE, None)
        first = await self._call(router_call, image)
        first["reason"] = "router"
        r = route(self.spec, first["label"], first["score"], RequestMeta(**meta))
        planned = {c.expert for c in r.calls}
        groups = await asyncio.gather(*(self._run(c, image, planned) for c in r.calls))
        results = [res for g in groups for res in g]
        outcome = aggregate(self.spec, [ExpertOutput(x["expert"], x["label"], x["score"]) for x in results])
        return {
            "category": r.category, "category_confidence": r.confidence, "fallback": r.fallback, "rules": list(r.rules),
            "verdict": outcome.verdict.value, "defect": outcome.defect, "trace": [first] + results,
            "latency_ms": (time.perf_counter() - t0) * 1000.0, "decided_by": outcome.decided_by or "",
        }
