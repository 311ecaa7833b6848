"""Admission at the ingress: past capacity, refuse early instead of queueing into deadline misses. Pure.

The ingress admits a request (one component) or a board (all its components at once) only while the
components in flight stay within `max_in_flight_components`; the rest is refused at once with
RESOURCE_EXHAUSTED, so a station backs off while the admitted work still finishes within its deadline.
The bound is components because that is what costs: a board of 50 weighs 50 single requests. Sized
from the served throughput: in flight / throughput is the queueing delay an admitted request can see.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh.errors import ResourceExhausted


@dataclass
class Admission:
    max_in_flight_components: int
    in_flight: int = 0

    def __post_init__(self) -> None:
        if self.max_in_flight_components < 1:
            raise ValueError(f"max_in_flight_components is {self.max_in_flight_components}; it must be at least 1")

    def admit(self, num_components: int, what: str = "request") -> None:
        """Count `num_components` in, or raise RESOURCE_EXHAUSTED (nothing counted) when they would not fit. A board
        larger than the whole bound is admitted alone, when nothing else is in flight (it is refused otherwise)."""
        fits = self.in_flight + num_components <= self.max_in_flight_components
        if not fits and not (self.in_flight == 0 and num_components > self.max_in_flight_components):
            raise ResourceExhausted(
                f"the ingress is at capacity: {self.in_flight} components in flight, the {what} brings "
                f"{num_components} and the limit is {self.max_in_flight_components}",
                fix="retry with backoff; if it lasts, add nodes or raise max_in_flight_components with them")
        self.in_flight += num_components

    def release(self, num_components: int) -> None:
        self.in_flight = max(0, self.in_flight - num_components)
