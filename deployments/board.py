"""Boards (`InspectBoard`): what is refused up front, and how a board's stream ends. Pure: no Ray, no gRPC.

A board is checked whole before any component runs, so a refused board streams nothing and ends with the
refusal's status: no components, too many, an id over its length limit, a component of another factory, an empty
or oversized image. An accepted board runs at most `max_in_flight` components at once (a huge board cannot take
the server over, and a client that gives up cancels only what is in flight), streams each result as it completes,
and a component that fails does not stop the others. The stream then ends with OK when every component answered,
or with the first failure's status and a message naming every failed component, so a station can never take a
partly inspected board for an inspected one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.errors import ExpertMeshError, InvalidArgument, PayloadTooLarge, PermissionDenied

MAX_ID_CHARS = 128
_MAX_LISTED_FAILURES = 5


class BoardLimits(BaseModel):
    """How big a board may be and how much of it runs at once (per board, in the ingress)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_components: int = Field(512, ge=1, description="a larger board is refused with INVALID_ARGUMENT")
    max_in_flight: int = Field(16, ge=1, description="components of one board running at once")


@dataclass(frozen=True)
class BoardComponent:
    """What the up-front check needs of one component (the glue copies it from the request)."""

    request_id: str
    factory_id: str
    station_id: str
    component_hint: str
    image_num_bytes: int


def valid_id(value: str) -> bool:
    """At most `MAX_ID_CHARS` printable ASCII characters (no control characters: ids reach logs and responses)."""
    return len(value) <= MAX_ID_CHARS and all(" " <= ch <= "~" for ch in value)


def echo_id(value: str) -> str:
    """What a response may echo of a client's id: the id when valid, else nothing."""
    return value if valid_id(value) else ""


def check_ids(fields: Sequence[tuple[str, str]], prefix: str = "") -> None:
    """Every id within `MAX_ID_CHARS` printable ASCII characters, or INVALID_ARGUMENT naming the field."""
    for name, value in fields:
        if len(value) > MAX_ID_CHARS:
            raise InvalidArgument(f"{name} is {len(value)} characters, over {MAX_ID_CHARS}", field=prefix + name,
                                  fix=f"send at most {MAX_ID_CHARS} characters")
        if not valid_id(value):
            raise InvalidArgument(f"{name} has a character outside printable ASCII", field=prefix + name,
                                  fix="use letters, digits, spaces and printable punctuation only")


def check_board(board_id: str, factory_id: str, station_id: str, components: Sequence[BoardComponent],
                limits: BoardLimits, max_image_bytes: int) -> None:
    """Refuse a board that cannot be run whole, naming the field at fault (`components[i].<field>`)."""
    if not factory_id:
        raise InvalidArgument("the board has no factory_id", field="factory_id",
                              fix="set the board's factory_id to your factory's id")
    check_ids((("board_id", board_id), ("factory_id", factory_id), ("station_id", station_id)))
    if not components:
        raise InvalidArgument("the board has no components", field="components",
                              fix="send at least one component image")
    if len(components) > limits.max_components:
        raise InvalidArgument(f"the board has {len(components)} components, over the limit of {limits.max_components}",
                              field="components", fix=f"split it into boards of at most {limits.max_components}")
    for i, c in enumerate(components):
        at = f"components[{i}]."
        check_ids((("request_id", c.request_id), ("factory_id", c.factory_id), ("station_id", c.station_id),
                   ("component_hint", c.component_hint)), prefix=at)
        if c.factory_id and c.factory_id != factory_id:
            raise PermissionDenied(f"component of factory {c.factory_id!r} on a board of factory {factory_id!r}",
                                   field=at + "factory_id", fix="send each factory's components on its own board")
        if c.image_num_bytes == 0:
            raise InvalidArgument("image is empty (0 bytes)", field=at + "image",
                                  fix="send the PNG or JPEG bytes of the component image")
        if c.image_num_bytes > max_image_bytes:
            raise PayloadTooLarge(f"image is {c.image_num_bytes} bytes, over the limit of {max_image_bytes}",
                                  field=at + "image", fix="send a smaller crop, or raise image.max_bytes in the spec")


def component_error(index: int, err: ExpertMeshError) -> ExpertMeshError:
    """`err` with its field placed under `components[index]`."""
    err.field = f"components[{index}].{err.field}" if err.field else f"components[{index}]"
    return err


def board_outcome(num_components: int, failures: dict[int, ExpertMeshError]) -> ExpertMeshError | None:
    """How the stream ends: None (OK) when every component answered, else an error with the status of the first
    failed component (by index) whose message counts and names the failed components."""
    if not failures:
        return None
    order = sorted(failures)
    first = failures[order[0]]
    listed = "; ".join(str(failures[i]) for i in order[:_MAX_LISTED_FAILURES])
    more = f"; and {len(order) - _MAX_LISTED_FAILURES} more" if len(order) > _MAX_LISTED_FAILURES else ""
    out = type(first)(f"{len(order)} of {num_components} components failed, results were sent for the rest: "
                      f"{listed}{more}", field=None,
                      fix=f"resend the failed components (indexes {', '.join(map(str, order[:20]))}"
                          f"{', ...' if len(order) > 20 else ''})")
    return out
