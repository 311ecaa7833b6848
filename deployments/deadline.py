"""Deadlines: a request's budget from its client, and calls to other deployments within it. Every way a handle call
can go wrong becomes an explicit error.

A request's deadline is the client's (`x-expertmesh-timeout-seconds`, HTTP header or gRPC metadata; not Serve's
`x-request-timeout-seconds`, which its HTTP proxy would race the ingress with) capped by the server's `request_timeout_s`, less a margin so the answer reaches the client
before its own deadline. The budgets nest: the proxy's `request_timeout_s` > the ingress's deadline > the router's
per-request deadline (the remaining budget it is sent, less its margin) > each expert host call (the host timeout or
the latest deadline among the call's rows, whichever is sooner). A request whose deadline passes gets
DEADLINE_EXCEEDED (HTTP 504), which a client does not blindly retry, and no more expert calls are sent for it.

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

from expertmesh.errors import DeadlineExceeded, ExpertMeshError, InvalidArgument, ResourceExhausted, Unavailable

LOSS_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)  # waits before the retries of a call whose replica died
TIMEOUT_HEADER = "x-expertmesh-timeout-seconds"  # the client's budget (gRPC keeps grpc-timeout from the app)
MIN_BUDGET_S = 0.05  # a budget below this is refused up front: it cannot be met
HOP_MARGIN_S = 0.1  # what each hop keeps back from its budget to answer in time (capped at 10% of the budget)


def request_budget_s(header_value: str | None, ceiling_s: float) -> float:
    """Seconds the server may spend on a request: the client's `x-expertmesh-timeout-seconds` (when given) capped by
    `ceiling_s` (the proxies' request_timeout_s), less the hop margin. A value that is not a positive number is
    INVALID_ARGUMENT naming the header."""
    budget_s = ceiling_s
    if header_value is not None and header_value.strip():
        try:
            client_s = float(header_value)
        except ValueError:
            client_s = float("nan")
        if not client_s > 0 or client_s != client_s or client_s == float("inf"):
            raise InvalidArgument(f"{TIMEOUT_HEADER} is {header_value[:32]!r}", field=TIMEOUT_HEADER,
                                  fix="send the seconds you will wait as a positive number, or leave it out")
        budget_s = min(budget_s, client_s)
    return budget_s - min(HOP_MARGIN_S, 0.1 * budget_s)


class Deadline:
    """A request's deadline on this process's monotonic clock (budgets cross processes as seconds left, never as
    times: nodes' clocks differ)."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.at_s = clock() + budget_s

    def remaining_s(self) -> float:
        return max(0.0, self.at_s - self.clock())

    def passed(self) -> bool:
        return self.clock() >= self.at_s

    def check(self, where: str) -> None:
        """DEADLINE_EXCEEDED when the deadline has passed (naming where the request was)."""
        if self.passed():
            raise exceeded(where)

    def for_next_hop(self) -> float:
        """The budget to send the next hop: what is left, less the margin this hop keeps to answer."""
        left = self.remaining_s()
        return max(0.0, left - min(HOP_MARGIN_S, 0.1 * left))


def exceeded(where: str) -> DeadlineExceeded:
    return DeadlineExceeded(f"the request's deadline passed {where}",
                            fix=f"send a longer {TIMEOUT_HEADER} (or client deadline), or retry when the cluster is "
                                "less loaded")


class ExpertCallFailed(Unavailable):
    """A deployment the request needed did not answer (it failed, or ran past its timeout)."""


class ReplicaLost(ExpertCallFailed):
    """The replica serving a call died (its node went away) and the retries found no other in time."""


async def call_with_deadline(send: Callable[[], Awaitable], timeout_s: float, what: str, *, timeout_fix: str,
                             full_fix: str, failure_fix: str, retries_on_loss: int = 4, wrap_failures: bool = True,
                             clock: Callable[[], float] = time.monotonic,
                             sleep: Callable[[float], Awaitable] = asyncio.sleep,
                             on_timeout: Callable[[], ExpertMeshError] | None = None):
    """Await `send()` (a DeploymentHandle call) within `timeout_s`; whatever goes wrong becomes an explicit error
    naming `what`: a timeout or a crash -> ExpertCallFailed (UNAVAILABLE), a full queue -> RESOURCE_EXHAUSTED.

    A call whose replica died is sent again, up to `retries_on_loss` times, after the pauses of `LOSS_BACKOFF_S`,
    while the deadline allows: inference is idempotent, and once Serve has noticed the loss the handle routes the
    retry to a live replica, or holds it until a replacement is up. `wrap_failures=False` re-raises an error from
    inside the replica as it is (the ingress turns those into INTERNAL). `on_timeout` gives the error of a timeout
    instead (DEADLINE_EXCEEDED when `timeout_s` was the request's own deadline)."""
    deadline = clock() + timeout_s
    for attempt in range(retries_on_loss + 1):
        try:
            return await asyncio.wait_for(send(), max(0.0, deadline - clock()))
        except asyncio.TimeoutError:
            if on_timeout is not None:
                raise on_timeout() from None
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
