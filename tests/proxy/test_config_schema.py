"""The JSON Schema for editors (idempo/proxy/config.schema.json) agrees with the loader."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from idempo.proxy.config import (
    JWTScope,
    ProxyConfigError,
    ProxySettings,
    RouteSettings,
    UpstreamSettings,
    load_config,
    parse_duration,
    parse_size,
)
from tests.proxy.test_config import BAD, FULL, MINIMAL, SAMPLE

SCHEMA: dict[str, Any] = json.loads((resources.files("idempo.proxy") / "config.schema.json").read_text())
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)

# The refusals of test_config.BAD a schema can express; the others need the loader (lease_ttl
# against the deadline, unique names, Starlette convertors, files, networks, outcomes named twice).
SCHEMA_CATCHES = {
    "memory-with-workers",
    "jwt-without-keys",
    "jwt-without-audience",
    "jwt-verify-false",
    "jwt-claim-not-a-string",
    "jwks-url-plain-http",
    "unknown-key",
    "bad-size",
    "bad-duration",
    "zero-ttl",
    "bad-status",
    "store-a-failure",
    "bad-on-takeover",
    "bad-client",
    "relative-path",
    "reserved-name",
    "passthrough-with-settings",
    "upstream-path",
    "upstream-scheme",
    "bad-listen",
    "zero-workers",
    "disable-not-bool",
    "bad-scope-kind",
    "bad-table",
    "route-no-path",
}


def test_the_schema_is_valid_draft_7_and_ships_in_the_package() -> None:
    """config.schema.json is a valid draft-07 schema (what editors read), found as package data."""
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize("text", [SAMPLE.read_text(), FULL, MINIMAL], ids=["sample", "full", "minimal"])
def test_good_files_pass_the_schema_and_the_loader(tmp_path: Path, text: str) -> None:
    """The sample and the test files that load are valid for the schema too."""
    assert list(VALIDATOR.iter_errors(tomllib.loads(text))) == []
    (tmp_path / "jwks.json").write_text((SAMPLE.parent / "jwks.json").read_text())
    path = tmp_path / "idempo-proxy.toml"
    path.write_text(text)
    load_config(path, environ={})


@pytest.mark.parametrize(("text", "key", "message"), [p for p in BAD if p.id in SCHEMA_CATCHES])
def test_bad_files_fail_the_schema_and_the_loader(tmp_path: Path, text: str, key: str, message: str) -> None:
    """A file the schema refuses, the loader refuses too (and the other way round, where a schema can tell)."""
    assert list(VALIDATOR.iter_errors(tomllib.loads(text))) != []
    path = tmp_path / "idempo-proxy.toml"
    path.write_text(text)
    with pytest.raises(ProxyConfigError):
        load_config(path, environ={})


def test_every_listed_refusal_exists() -> None:
    """SCHEMA_CATCHES names only cases of test_config.BAD."""
    assert {p.id for p in BAD} >= SCHEMA_CATCHES


def _properties(node: dict[str, Any]) -> set[str]:
    return set(node["properties"])


def test_the_schema_and_the_dataclasses_have_the_same_keys() -> None:
    """Each table of the schema has exactly the keys its dataclass (the loader's result) has."""
    props = SCHEMA["properties"]
    names = {f.name for f in dataclasses.fields(ProxySettings)}
    assert _properties(props["proxy"]) == names
    assert _properties(props["upstream"]) == {f.name for f in dataclasses.fields(UpstreamSettings)}
    settings = {f.name for f in dataclasses.fields(RouteSettings)} - {"fingerprint_body"} | {"fingerprint"}
    assert _properties(props["defaults"]) == settings
    assert _properties(props["route"]["items"]) == settings | {"name", "path", "passthrough"}
    jwt_branch = SCHEMA["definitions"]["scope"]["oneOf"][2]
    assert set(jwt_branch["propertyNames"]["enum"]) == {f.name for f in dataclasses.fields(JWTScope)} - {"kind"} | {
        "from"
    }
    assert _properties(jwt_branch) == set(jwt_branch["propertyNames"]["enum"])
    assert _properties(SCHEMA["definitions"]["outcomes"]) == {"store", "release", "hold", "hold_ttl", "on_takeover"}


def _parsed(name: str, value: object) -> object:
    if name in ("max_request_body", "max_response_body"):
        return parse_size(value)
    if isinstance(value, str) and value[:1].isdigit() and name not in ("listen", "store"):
        return parse_duration(value)
    return value


def test_the_schema_defaults_are_the_loader_defaults(tmp_path: Path) -> None:
    """Every default the schema states is what the loader gives a file that leaves the key out."""
    path = tmp_path / "idempo-proxy.toml"
    path.write_text(MINIMAL)
    config = load_config(path, environ={})
    tables = {"proxy": config.proxy, "upstream": config.upstream, "defaults": config.defaults}
    checked = 0
    for table, loaded in tables.items():
        for name, node in SCHEMA["properties"][table]["properties"].items():
            if "default" not in node:
                continue
            value = getattr(loaded, name if name != "fingerprint" else "fingerprint_body")
            default = node["default"]
            if name == "listen":
                value = str(value)
            elif name in ("methods", "trusted_proxies"):
                value = list(value)
            assert value == _parsed(name, default), f"{table}.{name}"
            checked += 1
    outcomes = SCHEMA["definitions"]["outcomes"]["properties"]
    assert config.defaults.outcomes.on_takeover == outcomes["on_takeover"]["default"]
    jwt = SCHEMA["definitions"]["scope"]["oneOf"][2]["properties"]
    for name in ("claim", "algorithms", "leeway", "jwks_cache_ttl", "jwks_timeout"):
        expected = jwt[name]["default"]
        actual = getattr(JWTScope(), name)
        assert (list(actual) if name == "algorithms" else actual) == _parsed(name, expected), name
    assert checked >= 20
