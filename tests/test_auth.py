"""Tokens (deployments/auth.py, no Ray): rotation without a restart, with an injected clock; ids the ingress echoes."""

from __future__ import annotations

import pytest

from expertmesh.deployments.auth import ReloadingTokens, TokenTable
from expertmesh.deployments.board import check_ids, echo_id, valid_id
from expertmesh.errors import InvalidArgument, Unauthenticated

OLD, NEW = "old-token-0123456789", "new-token-0123456789"


def test_a_rotated_tokens_file_applies_at_the_next_check_and_a_broken_one_keeps_the_last_good(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(f"{OLD}: factory-a\n")
    now = [0.0]
    errors: list[str] = []
    tokens = ReloadingTokens(path, check_every_s=2.0, clock=lambda: now[0], on_error=errors.append)
    assert tokens.factory_of(f"Bearer {OLD}") == "factory-a"
    path.write_text(f"{NEW}: factory-a\n")
    now[0] = 1.0  # not yet time to look
    assert tokens.factory_of(f"Bearer {OLD}") == "factory-a"
    now[0] = 2.5
    assert tokens.factory_of(f"Bearer {NEW}") == "factory-a"
    with pytest.raises(Unauthenticated):
        tokens.factory_of(f"Bearer {OLD}")  # rotated out
    path.write_text("not: [valid")  # a half-written file
    now[0] = 5.0
    assert tokens.factory_of(f"Bearer {NEW}") == "factory-a" and "keeping the last good one" in errors[0]
    path.unlink()
    now[0] = 8.0
    assert tokens.authorize(f"Bearer {NEW}", "factory-a") == "factory-a" and tokens.factories == {"factory-a"}


def test_a_missing_tokens_file_is_refused_at_start():
    with pytest.raises(InvalidArgument, match="cannot read tokens file"):
        ReloadingTokens("/nonexistent/tokens.yaml")
    assert TokenTable({OLD: "f"}).factories == {"f"}


def test_ids_are_bounded_printable_ascii_and_only_valid_ones_are_echoed():
    assert valid_id("line-3/station 2:cam#1") and echo_id("b1-7") == "b1-7"
    for bad in ("a" * 129, "evil\nlog line", "tab\there", "caf\u00e9"):
        assert not valid_id(bad) and echo_id(bad) == ""
        with pytest.raises(InvalidArgument) as err:
            check_ids((("request_id", bad),))
        assert err.value.field == "request_id"
