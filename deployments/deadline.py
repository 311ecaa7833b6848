"""Calls to other deployments with a deadline: every way a handle call can go wrong becomes an explicit error.

`call_with_deadline` is the one place the request path awaits another deployment (the ingress calling the router,
the router calling the expert hosts). A timeout or a crash is UNAVAILABLE naming what did not answer, a
full queue RESOURCE_EXHAUSTED, and a call whose replica died (its node was lost, or a redeploy removed it) is sent
again with a growing pause within the same deadline. The clock and the sleep are injected, so the retry schedule is
unit-tested without waiting for real.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from expertmesh.errors import ExpertMeshError, ResourceExhausted, Unavailable

LOSS_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)  # waits before the retries of a call whose replica died


class ExpertCallFailed(Unavailable):
    """A deployment the request needed did not answer (it failed, or ran past its timeout)."""


class ReplicaLost(ExpertCallFailed):
    """The replica serving a call died (its node went away) and the retries found no other in time."""


async def call_with_deadline(send: Callable[[], Awaitable], timeout_s: float, what: str, *, timeout_fix: str,
                             full_fix: str, failure_fix: str, retries_on_loss: int = 4, wrap_failures: bool = True,
                             clock: Callable[[], float] = time.monotonic,
                             sleep: Callable[[float], Awaitable] = asyncio.sleep):
    """Await `send()` (a DeploymentHandle call) within `timeout_s`; whatever goes wrong becomes an explicit error
    naming `what`: a timeout or a crash -> ExpertCallFailed (UNAVAILABLE), a full queue -> RESOURCE_EXHAUSTED.

    A call whose replica died is sent again, up to `retries_on_loss` times, after the pauses of `LOSS_BACKOFF_S`,
    while the deadline allows: inference is idempotent, and once Serve has noticed the loss the handle routes the
    retry to a live replica, or holds it until a replacement is up. `wrap_failures=False` re-raises an error from
    inside the replica as it is (the ingress turns those into INTERNAL)."""
    deadline = clock() + timeout_s
    for attempt in range(retries_on_loss + 1):
        try:
            return await asyncio.wait_for(send(), max(0.0, deadline - clock()))
        except asyncio.TimeoutError:
            raise ExpertCallFailed(f"{what} did not answer within {timeout_s:g} s", fix=timeout_fix) from None
        except RayTaskError as exc:  # raised inside the replica; Ray wraps it with the remote stack in its text
            if isinstance(exc.cause, ExpertMeshError):
                raise exc.cause from None  # a deliberate error: passed on as it was raised, without Ray's stack
            if not wrap_failures:
                raise
            raise ExpertCallFailed(f"{what} failed ({type(exc.cause).__name__})", fix=failure_fix) from None
        except ExpertMeshError:
            raise
        except BackPressureError:
            raise ResourceExhausted(f"{what} has a full queue", fix=full_fix) from None
        except (RayActorError, DeploymentUnavailableError) as exc:  # the replica or its node died, or a redeploy
            # removed the deployment (a lost node's expert host): retry while the deadline allows
            pause_s = LOSS_BACKOFF_S[min(attempt, len(LOSS_BACKOFF_S) - 1)]
            if attempt == retries_on_loss or clock() + pause_s >= deadline:
                raise ReplicaLost(f"{what} lost its replica ({type(exc).__name__})", fix=failure_fix) from None
            await sleep(pause_s)
        except Exception as exc:  # noqa: BLE001 - an error inside the replica
            if not wrap_failures:
                raise
            raise ExpertCallFailed(f"{what} failed ({type(exc).__name__})", fix=failure_fix) from None
