"""Per-factory bearer tokens: a YAML file of `token: factory_id` lines (or `tokens:` and `quotas:` sections, see
`deployments.quotas`), checked per request, and read again when it changes (`ReloadingTokens`). Pure but for
reading the file."""

from __future__ import annotations

import functools
import hmac
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from expertmesh.deployments.factory_table import FactoryTable
from expertmesh.deployments.quotas import FactoryQuota, QuotaTable
from expertmesh.deployments.tenancy import CoETable, resolve
from expertmesh.errors import InvalidArgument, PermissionDenied, Unauthenticated

TOKENS_ENV = "EXPERTMESH_TOKENS_FILE"
_BEARER = "bearer "


@dataclass(frozen=True)
class TokenTable:
    """token -> factory_id, and the factories' quotas. Lookups compare in constant time."""

    factories_by_token: dict[str, str]
    quotas: QuotaTable = QuotaTable()
    coes: CoETable = CoETable()

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise InvalidArgument(f"cannot read tokens file {str(path)!r}: {exc.strerror}", field="tokens_file",
                                  fix=f"point --tokens or {TOKENS_ENV} at a YAML file of `token: factory_id` lines") from None
        except yaml.YAMLError:
            raise InvalidArgument(f"tokens file {str(path)!r} is not valid YAML", field="tokens_file",
                                  fix="write one `token: factory_id` line per token") from None
        if not isinstance(data, dict) or not data:
            raise InvalidArgument(f"tokens file {str(path)!r} holds no `token: factory_id` lines", field="tokens_file",
                                  fix="add at least one line such as `s3cr3t-token: factory-a`")
        quotas, coes = QuotaTable(), CoETable()
        if isinstance(data.get("tokens"), dict):  # the sectioned form: tokens, quotas and CoEs
            unknown = set(data) - {"tokens", "quotas", "coes"}
            if unknown:
                raise InvalidArgument(f"tokens file {str(path)!r} has unknown sections {sorted(unknown)}",
                                      field="tokens_file", fix="keep only `tokens:`, `quotas:` and `coes:`")
            coes, quotas = _section(data, "coes", path), _section(data, "quotas", path)
            data = data["tokens"]
            if not data:
                raise InvalidArgument(f"tokens file {str(path)!r} has an empty `tokens:` section", field="tokens_file",
                                      fix="add at least one line such as `s3cr3t-token: factory-a` under `tokens:`")
        table = {}
        for token, factory in data.items():
            if not isinstance(token, str) or len(token) < 16 or not isinstance(factory, str) or not factory:
                raise InvalidArgument(f"bad entry for token {str(token)[:4]}... in {str(path)!r}", field="tokens_file",
                                      fix="each line is `<token of 16+ characters>: <factory_id>`")
            table[token] = factory
        return cls(table, quotas, coes)

    @functools.cached_property
    def factories(self) -> frozenset[str]:  # read per request (metrics labels): computed once per table
        return frozenset(self.factories_by_token.values())

    def factory_of(self, authorization: str | None) -> str:
        """The factory of an `authorization: Bearer <token>` value, or Unauthenticated."""
        if not authorization:
            raise Unauthenticated("no bearer token", field="authorization",
                                  fix="send metadata/header `authorization: Bearer <token>`")
        if not authorization.lower().startswith(_BEARER):
            raise Unauthenticated("authorization is not a bearer token", field="authorization",
                                  fix="send `authorization: Bearer <token>`")
        token = authorization[len(_BEARER):].strip()
        for known, factory in self.factories_by_token.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return factory
        raise Unauthenticated("unknown token", field="authorization", fix="use a token issued for your factory")

    def authorize(self, authorization: str | None, factory_id: str) -> str:
        """Check the token and that it belongs to `factory_id`; returns the factory."""
        factory = self.factory_of(authorization)
        if factory != factory_id:
            raise PermissionDenied(f"this token is not valid for factory_id {factory_id!r}", field="factory_id",
                                   fix="use the token issued for that factory, or send your own factory_id")
        return factory


# section -> (its table, what an entry is called, the fix for a bad entry, the fix for a section that is no mapping)
_SECTIONS: dict[str, tuple[type[FactoryTable], str, str, str]] = {
    "quotas": (QuotaTable, "quota", f"each quota is a mapping of {sorted(FactoryQuota.model_fields)} with positive "
                                    f"numbers", "factory -> {rate_per_s, burst, max_in_flight, weight}"),
    "coes": (CoETable, "CoE entry", "each entry is {allow: [spec names], use: one of them}",
             "factory -> {allow: [spec names], use: spec name}"),
}


def _section(data: dict, name: str, path: Path) -> FactoryTable:
    """The tokens file's per-factory section `name` (`quotas:`, `coes:`) as its table (empty when absent), or
    InvalidArgument naming the entry and the fix."""
    table, entry, entry_fix, shape = _SECTIONS[name]
    section = data.get(name) or {}
    if not isinstance(section, dict):
        raise InvalidArgument(f"`{name}:` in {str(path)!r} is not a mapping", field=name,
                              fix=f"write `{name}:` as {shape}")
    try:
        return table.from_mapping(section)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "factories")
        raise InvalidArgument(f"bad {entry} in {str(path)!r}: {first['msg']}", field=f"{name}.{where}",
                              fix=entry_fix) from None


class ReloadingTokens:
    """The tokens file, read again when it changes: tokens rotate without a restart. The file's modification time and
    size are checked at most every `check_every_s` (on the clock given); a changed file that does not load keeps the
    last good table and reports why through `on_error` (a half-written file must not lock every station out)."""

    def __init__(self, path: str | Path, check_every_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, on_error: Callable[[str], object] = print) -> None:
        self.path, self.check_every_s, self.clock, self.on_error = Path(path), check_every_s, clock, on_error
        self.table = TokenTable.load(self.path)
        self._stamp = self._stat()
        self._checked_s = clock()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def current(self) -> TokenTable:
        now = self.clock()
        if now - self._checked_s >= self.check_every_s:
            self._checked_s = now
            stamp = self._stat()
            if stamp != self._stamp:
                try:
                    self.table = TokenTable.load(self.path)
                    self._stamp = stamp
                except InvalidArgument as err:
                    self.on_error(f"tokens file changed but was not loaded, keeping the last good one: {err}")
        return self.table

    @property
    def factories(self) -> frozenset[str]:
        return self.current().factories

    def factory_of(self, authorization: str | None) -> str:
        return self.current().factory_of(authorization)

    def authorize(self, authorization: str | None, factory_id: str) -> str:
        return self.current().authorize(authorization, factory_id)

    def quota(self, factory: str) -> FactoryQuota:
        return self.current().quotas.of(factory)

    def coe(self, factory: str, requested: str, served: list[str], field: str = "coe") -> str:
        """The CoE a request of `factory` runs on (`deployments.tenancy.resolve`)."""
        return resolve(self.current().coes, factory, requested, served, field)


def write_dev_tokens(path: Path, factories: list[str]) -> dict[str, str]:
    """Create a tokens file with one fresh random token per factory (mode 0600); returns factory -> token."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = {f: f"dev-{f}-{secrets.token_urlsafe(18)}" for f in factories}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# ExpertMesh dev tokens: `token: factory_id`\n")
        yaml.safe_dump({t: f for f, t in tokens.items()}, fh)
    return tokens
