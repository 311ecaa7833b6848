"""Which CoEs a factory may use, and which one a request gets. Pure.

A cluster may serve several CoEs (`expertmesh serve --spec A.yaml --coe B.yaml ...`: one per product line, say).
The tokens file's `coes:` section says which of them each factory may use and which it gets when a request names
none; without it every factory may use every CoE and gets the first one (the app's `--spec`):

    tokens:
      <token of 16+ characters>: factory-a
    coes:
      default:   {allow: [pcb-aoi]}                          # every factory not listed
      factory-b: {allow: [pcb-aoi, power-boards], use: power-boards}

A request names its CoE by the spec's `name` (`InspectRequest.coe`, the HTTP body's `coe`). One the cluster does not
serve is NOT_FOUND; one the factory may not use is PERMISSION_DENIED; both name the field and the choices.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from expertmesh.deployments.factory_table import FactoryTable
from expertmesh.errors import NotFound, PermissionDenied


class FactoryCoEs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allow: list[str] | None = Field(None, description="the CoEs (spec names) it may use; none: every one served")
    use: str | None = Field(None, description="the CoE a request that names none gets; none: the first allowed")

    @model_validator(mode="after")
    def _use_is_allowed(self) -> FactoryCoEs:
        if self.use is not None and self.allow is not None and self.use not in self.allow:
            raise ValueError(f"use {self.use!r} is not in allow {self.allow}; add it to allow or pick one of them")
        return self


class CoETable(FactoryTable[FactoryCoEs]):
    """factory -> the CoEs it may use, with `default` for every factory not listed: the file's `coes:` section."""

    def unknown_names(self, served: list[str]) -> list[str]:
        """CoE names the table mentions that the cluster does not serve (a typo, or a spec not deployed)."""
        named = {n for f in (self.default, *self.factories.values()) for n in (f.allow or []) + ([f.use] if f.use else [])}
        return sorted(named - set(served))


def resolve(table: CoETable, factory: str, requested: str, served: list[str], field: str = "coe") -> str:
    """The CoE a request of `factory` runs on: the one it names (`requested`), else its default. `served`: the CoEs the
    cluster serves, the app's first CoE first."""
    rule = table.of(factory)
    allowed = [n for n in served if rule.allow is None or n in rule.allow]
    if not requested:
        if rule.use is not None and rule.use in served:
            return rule.use
        if not allowed:
            raise PermissionDenied(f"factory {factory!r} may use none of the CoEs served ({', '.join(served)})",
                                   field=field, fix="ask the operator to allow one in the tokens file's `coes:`")
        return allowed[0]
    if requested not in served:
        raise NotFound(f"no CoE named {requested[:64]!r} is served here", field=field,
                       fix=f"name one of: {', '.join(served)}, or leave {field} empty for your factory's default")
    if requested not in allowed:
        raise PermissionDenied(f"factory {factory!r} may not use CoE {requested!r}", field=field,
                               fix=f"name one of: {', '.join(allowed) or '(none)'}, or ask the operator to allow it")
    return requested
