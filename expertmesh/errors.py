"""The one errors module: every error ExpertMesh raises on purpose has one shape and one status.

An error carries a stable `code` (an `ErrorCode`), a human `message`, and optionally the
`field` at fault and the `fix`. The ingresses (gRPC and HTTP) and the CLI map codes to their
status in *this* module only (`grpc_status`, `ExpertMeshError.http_status`, `ExpertMeshError.cli_exit_code`),
so the same fault reads the same everywhere.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar


class ErrorCode(str, enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"


# code -> (gRPC status name, HTTP status). gRPC names are grpc.StatusCode member names.
_STATUS: dict[ErrorCode, tuple[str, int]] = {
    ErrorCode.INVALID_ARGUMENT: ("INVALID_ARGUMENT", 400),
    ErrorCode.NOT_FOUND: ("NOT_FOUND", 404),
    ErrorCode.FAILED_PRECONDITION: ("FAILED_PRECONDITION", 400),
    ErrorCode.UNAUTHENTICATED: ("UNAUTHENTICATED", 401),
    ErrorCode.PERMISSION_DENIED: ("PERMISSION_DENIED", 403),
    ErrorCode.RESOURCE_EXHAUSTED: ("RESOURCE_EXHAUSTED", 429),
    ErrorCode.PAYLOAD_TOO_LARGE: ("INVALID_ARGUMENT", 413),
    ErrorCode.UNAVAILABLE: ("UNAVAILABLE", 503),
    ErrorCode.DEADLINE_EXCEEDED: ("DEADLINE_EXCEEDED", 504),
    ErrorCode.INTERNAL: ("INTERNAL", 500),
}

#: Exit code of a CLI command that was given bad input (a spec, a flag, a file, a token): the caller must change
#: what it passed. argparse's own usage errors exit with 2 too.
CLI_EXIT_CODE = 2
#: Exit code of a CLI command that failed at run time (a cluster unreachable, a deadline passed, an internal fault):
#: the same command may work later.
CLI_RUNTIME_EXIT_CODE = 1
#: The codes whose errors are the caller's input; the rest are runtime failures.
_INPUT_CODES = frozenset({ErrorCode.INVALID_ARGUMENT, ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.NOT_FOUND,
                          ErrorCode.FAILED_PRECONDITION, ErrorCode.UNAUTHENTICATED, ErrorCode.PERMISSION_DENIED})


class ExpertMeshError(Exception):
    """Base of every deliberate error. Subclasses fix the `code`."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field, self.fix = message, field, fix

    def __str__(self) -> str:
        parts = [f"{self.field}: {self.message}" if self.field else self.message]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, str]:
        out = {"code": self.code.value, "message": self.message}
        if self.field:
            out["field"] = self.field
        if self.fix:
            out["fix"] = self.fix
        return out

    @property
    def grpc_status_name(self) -> str:
        return _STATUS[self.code][0]

    @property
    def http_status(self) -> int:
        return _STATUS[self.code][1]

    @property
    def cli_exit_code(self) -> int:
        """2 for bad input (CLI_EXIT_CODE), 1 for a runtime failure (CLI_RUNTIME_EXIT_CODE)."""
        return CLI_EXIT_CODE if self.code in _INPUT_CODES else CLI_RUNTIME_EXIT_CODE


class InvalidArgument(ExpertMeshError):
    code = ErrorCode.INVALID_ARGUMENT


class PayloadTooLarge(ExpertMeshError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class NotFound(ExpertMeshError):
    code = ErrorCode.NOT_FOUND


class FailedPrecondition(ExpertMeshError):
    code = ErrorCode.FAILED_PRECONDITION


class Unauthenticated(ExpertMeshError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(ExpertMeshError):
    code = ErrorCode.PERMISSION_DENIED


class ResourceExhausted(ExpertMeshError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class Unavailable(ExpertMeshError):
    code = ErrorCode.UNAVAILABLE


class DeadlineExceeded(ExpertMeshError):
    """The request's deadline (the client's, or the server's request_timeout_s) passed before it was answered."""

    code = ErrorCode.DEADLINE_EXCEEDED


class Internal(ExpertMeshError):
    code = ErrorCode.INTERNAL


@dataclass(frozen=True)
class SpecProblem:
    """One thing wrong with a CoE spec: where (a path such as `categories[2].experts[0]`), what, and the fix."""

    field: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" + (f"; fix: {self.fix}" if self.fix else "")


class SpecError(InvalidArgument):
    """A CoE spec that cannot be used; `problems` lists every fault found, not just the first."""

    def __init__(self, problems: list[SpecProblem], source: str = "<spec>") -> None:
        self.problems, self.source = list(problems), source
        super().__init__(f"{source}: {len(self.problems)} problem(s) in the CoE spec")

    def __str__(self) -> str:
        return "\n".join([self.message] + [f"  - {p}" for p in self.problems])


def grpc_status(err: ExpertMeshError):
    """The grpc.StatusCode for `err` (grpc imported lazily so pure code never needs it)."""
    import grpc

    return getattr(grpc.StatusCode, err.grpc_status_name)
