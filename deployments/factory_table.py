"""A per-factory table, as the tokens file's sections write it: a `default` entry for every factory not listed, plus
entries per factory (`deployments.quotas`, `deployments.tenancy`). Pure."""

from __future__ import annotations

from typing import Any, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

Entry = TypeVar("Entry", bound=BaseModel)


class FactoryTable(BaseModel, Generic[Entry]):
    """factory -> entry, with `default` for every factory not listed. An entry model whose fields all have defaults
    makes a table with no `default` (or an empty one) use those defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Entry
    factories: dict[str, Entry] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_entry(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("default") is None:
            data = {**data, "default": {}}
        return data

    @classmethod
    def from_mapping(cls, data: dict) -> Self:
        """The file's section as a mapping (factory -> entry, `default` included)."""
        return cls(default=data.get("default"), factories={k: v for k, v in data.items() if k != "default"})

    def of(self, factory: str) -> Entry:
        return self.factories.get(factory, self.default)
