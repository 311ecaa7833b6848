"""Live expert changes: which spec revisions a running app serves, and how one change moves it. Pure.

The state names the stable revision (every request's, unless a canary takes it), an optional canary (a share of one
factory's requests) and the previous stable revision (what `rollback` returns to). Every revision is a spec file;
"" is the spec the app was built with. `known` is what the expert hosts and the ingress must be able to serve: the
revisions in use, plus the previous one, so a rollback never waits for a load of anything but weights.

A change is applied in two steps (`plan_change`), because Serve reconfigures the router and the hosts at the same
time: first the hosts and the ingress learn the new revision (the router still sends only the old one), then the
router switches. No request ever reaches a host that does not know its revision, so none fails. The next change
drops revisions nobody uses any more.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CanaryState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str = Field(description="the canary revision's spec file")
    factory: str = Field(min_length=1, description="the factory whose requests it takes a share of")
    share: float = Field(gt=0, le=1, description="the share of that factory's requests it answers (0..1]")

    @field_validator("share")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"share {v} is not in (0, 1]; give the canary's share of the factory's requests, e.g. 0.1")
        return v


class RolloutState(BaseModel):
    """What the running app serves. Revision 0 (the default) is the app as built: the base spec, no canary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    revision: int = Field(0, ge=0, description="+1 for every change applied")
    stable: str = Field("", description="the stable revision's spec file; '': the spec the app was built with")
    previous: str | None = Field(None, description="the stable revision before the last update (rollback target)")
    canary: CanaryState | None = None
    known: tuple[str, ...] = Field((), description="revisions the hosts and ingress hold, besides the base")
    note: str = Field("", description="the last change, in words")
    digests: dict[str, str] = Field(default_factory=dict, description="spec file -> the sha256 of its bytes when "
                                                                      "first served (a served file must not change)")

    def in_use(self) -> tuple[str, ...]:
        """Revisions requests may be sent with now (stable first)."""
        return (self.stable,) + ((self.canary.spec,) if self.canary else ())

    def router_config(self) -> dict:
        """The router's part of its user_config: which revision each request takes."""
        return {"revision": self.revision, "stable": self.stable,
                "canary": self.canary.model_dump() if self.canary else None}


class RolloutRefused(ValueError):
    """A change that cannot apply to the current state; the message names the fix."""


def _keep(*paths: str | None) -> tuple[str, ...]:
    out: list[str] = []
    for p in paths:
        if p and p not in out:
            out.append(p)
    return tuple(out)


def _two_steps(state: RolloutState, final: RolloutState, note: str) -> list[RolloutState]:
    """[hosts learn every revision of both states, then the router switches] (one step when nothing new is known).
    The final state still knows what the current one uses: requests in flight finish on it; the next change drops it."""
    final = final.model_copy(update={"revision": state.revision + 1, "note": note,
                                     "known": _keep(*final.in_use(), final.previous, *state.in_use())})
    widened = _keep(*state.known, *final.known)
    if set(widened) == set(state.known):
        return [final]
    return [state.model_copy(update={"known": widened}), final]


def update(state: RolloutState, spec: str) -> list[RolloutState]:
    """Make `spec` the stable revision for every request (a running canary ends)."""
    if state.canary is None and spec == state.stable:
        raise RolloutRefused(f"{spec or 'the built spec'} is already the stable revision; write the change into a new "
                             "spec file and update to that")
    final = state.model_copy(update={"stable": spec, "previous": state.stable, "canary": None})
    return _two_steps(state, final, f"update to {spec or 'the built spec'}")


def start_canary(state: RolloutState, spec: str, factory: str, share: float) -> list[RolloutState]:
    """Send `share` of `factory`'s requests to `spec` (each also runs on the stable revision, for the agreement)."""
    if spec == state.stable:
        raise RolloutRefused(f"{spec or 'the built spec'} is the stable revision; a canary needs another spec file")
    canary = CanaryState(spec=spec, factory=factory, share=share)
    final = state.model_copy(update={"canary": canary})
    return _two_steps(state, final, f"canary {spec} for {share:.0%} of {factory}")


def promote(state: RolloutState) -> list[RolloutState]:
    """The canary becomes the stable revision."""
    if state.canary is None:
        raise RolloutRefused("no canary is running; start one with `expertmesh rollout canary SPEC --factory F`")
    return update(state, state.canary.spec)


def rollback(state: RolloutState) -> list[RolloutState]:
    """End the canary if one runs, else return to the previous stable revision."""
    if state.canary is not None:
        final = state.model_copy(update={"canary": None})
        return _two_steps(state, final, f"canary {state.canary.spec} ended")
    if state.previous is None:
        raise RolloutRefused("nothing to roll back to: no update was applied since the app was deployed")
    final = state.model_copy(update={"stable": state.previous, "previous": state.stable})
    return _two_steps(state, final, f"rolled back to {state.previous or 'the built spec'}")
