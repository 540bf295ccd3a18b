"""The Grafana dashboard and the Prometheus alerting rules in contrib/ use only what idempo exports.

The exported metric names, label names and label values come from a live registry
after real requests over HTTP (every outcome the files name, failed store calls, a
takeover), not from a list kept by hand: renaming a metric or a label fails here. The
PromQL is read by a small tokenizer (selectors, their label matchers, grouping
labels), enough to find every name an expression uses. The rules' and the
dashboard's PromQL also go through promtool (``promtool check rules``, and the
alerts' unit tests with ``promtool test rules``) when it is there: ``$IDEMPO_PROMTOOL``
or on PATH; ``scripts/fetch-promtool`` gets it, and CI requires it
(``IDEMPO_REQUIRE_PROMTOOL=1`` in .ci/run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from idempo import AsyncStore, Policy, StoredResponse
from idempo.asgi import IdempotencyMiddleware
from idempo.exceptions import StoreUnavailable
from idempo.metrics import PrometheusMetrics
from idempo.observability import Outcome, instrument, uninstrument
from idempo.stores import AsyncMemoryStore
from tests.support.clock import FakeClock
from tests.support.servers import running_asgi

from .conftest import ROUTES, SECRET, Handlers, Site, eventually, record_key
from .test_logs import dead_redis_store

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "contrib" / "grafana" / "idempo.json"
ALERTS = ROOT / "contrib" / "prometheus" / "idempo-alerts.yml"
ALERT_TESTS = ROOT / "contrib" / "prometheus" / "idempo-alerts.test.yml"

#: Labels Prometheus itself adds to every series it scrapes (its target labels), not idempo's.
TARGET_LABELS = frozenset({"job", "instance"})
#: Variables Grafana defines itself.
GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"})
# Example values for Grafana's variables, to hand the dashboard's PromQL to promtool.
_GRAFANA_EXAMPLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "6h", "job": ".*", "route": ".*"}


# --- what idempo exports, from a live registry -------------------------------------------------


@dataclass
class Exported:
    """Sample names with the label names seen on them, and the values seen per label name."""

    labels: dict[str, set[str]] = field(default_factory=dict)
    values: dict[str, set[str]] = field(default_factory=dict)
    families: dict[str, set[str]] = field(default_factory=dict)  # family -> its sample names

    def allowed_values(self, label: str) -> set[str]:
        """The values a matcher on ``label`` may name: those seen, and every Outcome for ``outcome``."""
        seen = self.values.get(label, set())
        return seen | {str(o) for o in Outcome} if label == "outcome" else seen


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("", "_count", "_sum")}


def read_registry(registry: CollectorRegistry) -> Exported:
    """What ``registry`` exports: every family's sample names (from its type, so a family with no
    sample yet counts), and the label names and values of the samples it has."""
    exported = Exported()
    for family in registry.collect():
        names = {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
        exported.families[family.name] = names
        for name in names:
            exported.labels.setdefault(name, set())
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # prometheus-client's creation timestamps, exported but nothing to chart
            exported.labels.setdefault(sample.name, set()).update(sample.labels)
            for label, value in sample.labels.items():
                exported.values.setdefault(label, set()).add(value)
    return exported


class FailingSaves(AsyncMemoryStore):
    """A memory store whose ``complete`` raises StoreUnavailable ``failures`` times: down while results are saved."""

    store_name = "memory"  # the store label: a memory store

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def complete(self, record_key: str, token: int, response: StoredResponse, record_ttl_ms: int) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("the store is down (injected)")
        await super().complete(record_key, token, response, record_ttl_ms)


@contextmanager
def _site(store: AsyncStore | None = None, policy: Policy | None = None) -> Iterator[Site]:
    """The observability tests' app behind idempo under uvicorn (as conftest's ``serve`` builds it)."""
    clock = FakeClock()
    store = store if store is not None else AsyncMemoryStore(clock=clock)
    handlers = Handlers()
    with ExitStack() as stack:
        stack.callback(handlers.gate.set)  # never leave a handler waiting
        url = stack.enter_context(
            running_asgi(IdempotencyMiddleware(handlers.app(), store, policy=policy, routes=ROUTES, secret=SECRET))
        )
        client = stack.enter_context(httpx.Client(base_url=url, timeout=30, trust_env=False))
        yield Site(url, client, handlers, store, clock)


def exercise(registry: CollectorRegistry) -> None:
    """Real requests that make idempo record every metric: each outcome the files name, store calls
    that fail (unavailable, lease_lost), a lease held while a handler runs, takeovers (executed and
    held), saves retried after the handler (saved and given up)."""

    def count(outcome: str) -> float:
        return sum(
            registry.get_sample_value("idempo_requests_total", {"outcome": outcome, "method": "POST", "route": route})
            or 0.0
            for route in ("*", "/orders/*", "/held")
        )

    with _site() as site:
        site.post()  # executed
        site.post()  # replayed
        site.post(body=b'{"other":1}')  # mismatch (422)
        site.post("/failing")  # released
        site.post("/held")  # held
        site.store.sync.begin(record_key("/orders/2"), "crashed", 1000)  # type: ignore[attr-defined]
        site.clock.advance(2)
        site.post("/orders/2")  # lease_takeover
        # A slow holder: a duplicate meanwhile gets 409; once its lease expired, a retry takes the
        # record over, and the holder's complete is refused (lease_lost).
        holder = threading.Thread(target=site.post, args=("/slow",), kwargs={"key": "slow-key"})
        holder.start()
        assert site.handlers.entered.wait(10)
        assert site.post("/slow", key="slow-key").status_code == 409  # conflict
        site.clock.advance(60)
        site.handlers.entered.clear()
        retry = threading.Thread(target=site.post, args=("/slow",), kwargs={"key": "slow-key"})
        retry.start()
        assert site.handlers.entered.wait(10)
        site.handlers.gate.set()
        holder.join(10)
        retry.join(10)
        errors = {"store": "memory", "operation": "complete", "error": "lease_lost"}
        eventually(lambda: registry.get_sample_value("idempo_store_operation_errors_total", errors) == 1)
    # A save that fails once after the handler ran is retried and lands; one the store refuses
    # for all of save_retry_for is given up.
    with _site(store=FailingSaves(failures=1)) as flaky:
        flaky.handlers.gate.set()
        assert flaky.post("/slow").status_code == 201
        saved = {"store": "memory", "result": "saved"}
        eventually(lambda: registry.get_sample_value("idempo_saves_total", saved))
    with _site(store=FailingSaves(failures=10**9), policy=Policy(save_retry_for=0.3)) as down:
        down.handlers.gate.set()
        assert down.post("/slow").status_code == 201
        given_up = {"store": "memory", "result": "given_up"}
        eventually(lambda: registry.get_sample_value("idempo_saves_total", given_up))
    # on_takeover="hold": an expired lease with no result holds the key instead of running the handler.
    with _site(policy=Policy(on_takeover="hold")) as holding:
        holding.store.sync.begin(record_key("/failing"), "crashed", 1000)  # type: ignore[attr-defined]
        holding.clock.advance(2)
        assert holding.post("/failing").status_code == 409  # takeover_held
        assert holding.handlers.executions["failing"] == 0
    with _site(store=dead_redis_store()) as closed:
        assert closed.post().status_code == 503  # store_error
    with _site(store=dead_redis_store(), policy=Policy(fail_open=True)) as opened:
        assert opened.post("/failing").status_code == 500  # bypassed (under the default policy)
    eventually(lambda: count("bypassed") == 1)
    for outcome in ("executed", "replayed", "mismatch", "released", "held", "lease_takeover", "conflict"):
        assert count(outcome) >= 1, outcome


@pytest.fixture(scope="module")
def exported() -> Exported:
    """What idempo exports once exercised, read from its own registry."""
    registry = CollectorRegistry()
    instrument(metrics=registry)
    try:
        exercise(registry)
    finally:
        uninstrument()
    return read_registry(registry)


# --- PromQL, read enough to find its names ------------------------------------------------------

_TOKEN = re.compile(
    r"""
      (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*\b)
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}@])
    """,
    re.VERBOSE,
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"})


@dataclass(frozen=True)
class Selector:
    """A vector selector: its metric name (None for ``{__name__=...}``) and its ``(label, op, value)`` matchers."""

    metric: str | None
    matchers: tuple[tuple[str, str, str], ...]


@dataclass
class Uses:
    """What one PromQL expression names."""

    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # by, without, on, ignoring, group_left/right
    functions: set[str] = field(default_factory=set)


def tokens(expr: str) -> list[tuple[str, str]]:
    """``(kind, text)`` of each token, spaces and comments dropped; ValueError on a character PromQL has not."""
    found, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read {expr[position : position + 20]!r} in {expr!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            found.append((kind, match.group()))
        position = match.end()
    return found


def unquote(text: str) -> str:
    """A PromQL string's value (the escapes idempo's files use: \\\\ and \\")."""
    return text[1:-1] if text.startswith("`") else re.sub(r"\\(.)", r"\1", text[1:-1])


def parse(expr: str) -> Uses:
    """The selectors, grouping labels and functions of a PromQL expression."""
    toks, uses, i = tokens(expr), Uses(), 0

    def at(j: int) -> str:
        return toks[j][1] if j < len(toks) else ""

    def matchers(j: int) -> tuple[tuple[tuple[str, str, str], ...], int]:
        # toks[j] is "{": label op "value" [, ...] }
        found = []
        j += 1
        while at(j) != "}":
            label, op, value = toks[j], at(j + 1), toks[j + 2] if j + 2 < len(toks) else ("", "")
            if label[0] != "ident" or op not in ("=", "!=", "=~", "!~") or value[0] != "string":
                raise ValueError(f"cannot read the matchers of {expr!r} at {label[1]!r}")
            found.append((label[1], op, unquote(value[1])))
            j += 3
            if at(j) == ",":
                j += 1
        return tuple(found), j + 1

    while i < len(toks):
        kind, text = toks[i]
        if kind == "ident" and text in _GROUPING:
            i += 1
            if at(i) == "(":
                i += 1
                while at(i) != ")":
                    if toks[i][0] == "ident":
                        uses.grouping.add(toks[i][1])
                    i += 1
        elif kind == "ident" and text.lower() in _KEYWORDS:
            i += 1
        elif kind == "ident" and (at(i + 1) == "(" or at(i + 1) in ("by", "without")):
            uses.functions.add(text)  # a function, or an aggregation: sum(...), sum by (...) (...)
            i += 1
        elif kind == "ident":
            found: tuple[tuple[str, str, str], ...] = ()
            if at(i + 1) == "{":
                found, i = matchers(i + 1)
            else:
                i += 1
            uses.selectors.append(Selector(text, found))
        elif text == "{":
            found, i = matchers(i)
            uses.selectors.append(Selector(None, found))
        else:
            i += 1
    return uses


def test_parse_reads_selectors_matchers_and_grouping() -> None:
    """The tokenizer finds metric names, matchers (with Grafana variables) and grouping labels, not functions."""
    uses = parse(
        'histogram_quantile(0.99, sum by (le, store) (rate(a_bucket{job=~"$job", error!="x"}[$__rate_interval])))\n'
        "/ on (job) group_left (route) b offset 15m > bool 2 and c_total{q='v\\'s'}"
    )
    assert uses.selectors == [
        Selector("a_bucket", (("job", "=~", "$job"), ("error", "!=", "x"))),
        Selector("b", ()),
        Selector("c_total", (("q", "=", "v's"),)),
    ]
    assert uses.grouping == {"le", "store", "job", "route"}
    assert uses.functions == {"histogram_quantile", "sum", "rate"}


# --- checking names against what is exported ---------------------------------------------------


def _alternatives(value: str) -> list[str] | None:
    """The words a matcher value names: itself, or each of ``a|b|c``; None for a pattern or a variable."""
    return value.split("|") if re.fullmatch(r"[A-Za-z0-9_:./*+-]+(?:\|[A-Za-z0-9_:./*+-]+)*", value) else None


def problems(where: str, uses: Uses, exported: Exported, *, check_values: bool = True) -> list[str]:
    """Every name in ``uses`` that idempo does not export, as one line each (empty when all are)."""
    found: list[str] = []
    labels_in_use = set(TARGET_LABELS)
    for selector in uses.selectors:
        metric = selector.metric
        if metric is None:
            found.append(f"{where}: a selector without a metric name")
            continue
        if metric not in exported.labels:
            near = get_close_matches(metric, exported.labels, n=1)
            found.append(
                f"{where}: idempo exports no metric {metric}" + (f" (did you mean {near[0]}?)" if near else "")
            )
            continue
        known = exported.labels[metric] | TARGET_LABELS
        labels_in_use |= known
        for label, op, value in selector.matchers:
            if label not in known:
                found.append(f"{where}: {metric} has no label {label} (it has {sorted(exported.labels[metric])})")
            elif check_values and label not in TARGET_LABELS and "$" not in value:
                words = _alternatives(value) if op in ("=~", "!~") else [value]
                allowed = exported.allowed_values(label)
                for word in words or []:
                    if word not in allowed:
                        found.append(f"{where}: {label}{op}{value!r}: idempo gives {label} no value {word!r}")
    for label in sorted(uses.grouping - labels_in_use):
        found.append(f"{where}: groups by {label}, a label none of its metrics has")
    return found


# Appended to a failure: what to do when idempo's metrics changed.
_HOW = (
    "\n(A metric renamed or added in idempo.metrics: update contrib/grafana/idempo.json and"
    " contrib/prometheus/idempo-alerts.yml, and docs/operating.md's tables. A label or value seen"
    " nowhere yet: make exercise() in this file produce it, so the registry shows it.)"
)


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, expr)`` of every query in the dashboard: panel targets (rows included)."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                yield f"panel {panel['title']!r} {target['refId']}", target["expr"]

    yield from walk(dashboard["panels"])


def variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """``(name, selector, label)`` of every ``label_values(selector, label)`` template variable."""
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
            assert match, f"variable {variable['name']}: {query!r} is not label_values(selector, label)"
            yield variable["name"], match.group(1), match.group(2)


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text("utf-8"))
    return data


def load_alerts() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ALERTS.read_text("utf-8"))
    return data


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_alerts()["groups"] for rule in group["rules"]]


def test_dashboard_uses_only_exported_metrics_and_labels(exported: Exported) -> None:
    """Every metric, label and label value in the dashboard's queries and variables is one idempo exports."""
    dashboard = load_dashboard()
    found: list[str] = []
    expressions = list(dashboard_expressions(dashboard))
    assert len(expressions) >= 12
    for where, expr in expressions:
        found += problems(where, parse(expr), exported)
    for name, selector, label in variable_queries(dashboard):
        uses = parse(selector)
        uses.grouping.add(label)  # the label read must be one the selector's metric has
        found += problems(f"variable {name}", uses, exported)
    assert not found, "\n".join(found) + _HOW


def test_alert_rules_use_only_exported_metrics_and_labels(exported: Exported) -> None:
    """Every metric, label and label value in the alerting rules, and in their unit tests' series, is idempo's."""
    found: list[str] = []
    for rule in alert_rules():
        found += problems(f"alert {rule['alert']}", parse(rule["expr"]), exported)
    for number, test in enumerate(yaml.safe_load(ALERT_TESTS.read_text("utf-8"))["tests"]):
        for series in test["input_series"]:
            # Made-up series may name stores and errors this test never produced (postgres): names only.
            found += problems(f"unit test {number} series", parse(series["series"]), exported, check_values=False)
    assert not found, "\n".join(found) + _HOW


def test_dashboard_shows_every_metric_idempo_exports(exported: Exported) -> None:
    """Each metric family idempo registers has a panel: a metric added to idempo.metrics must be charted too."""
    used = {s.metric for _, expr in dashboard_expressions(load_dashboard()) for s in parse(expr).selectors}
    missing = sorted(family for family, names in exported.families.items() if not names & used)
    assert not missing, f"no panel of contrib/grafana/idempo.json shows {missing}" + _HOW


def test_exported_names_come_from_idempo_metrics() -> None:
    """The live registry holds idempo's metrics only, so the checks above compare with idempo's names alone."""
    registry = CollectorRegistry()
    PrometheusMetrics(registry)
    assert {family.name for family in registry.collect()} == set(read_registry(registry).families)
    assert all(name.startswith("idempo_") for name in read_registry(registry).families)


def test_a_renamed_metric_or_label_is_reported(exported: Exported) -> None:
    """The check finds a metric, a label, a label value and a grouping label idempo does not export."""
    uses = parse(
        'sum by (rout) (rate(idempo_request_total[5m])) + sum(rate(idempo_requests_total{outcom="x"}[5m]))'
        ' + sum(rate(idempo_requests_total{outcome=~"replayed|replay"}[5m]))'
    )
    found = "\n".join(problems("x", uses, exported))
    assert "no metric idempo_request_total (did you mean idempo_requests_total?)" in found
    assert "has no label outcom" in found
    assert "no value 'replay'" in found
    assert "groups by rout" in found


# --- structure ----------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    """The dashboard is a Grafana dashboard: unique panel ids, panels within 24 columns and not overlapping,
    every query on the data source variable, every variable it uses defined."""
    dashboard = load_dashboard()
    assert dashboard["uid"] == "idempo-overview"
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in ("x", "y", "w", "h")), panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source, panel["title"]
        assert panel["description"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids, panel["title"]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        assert all(t["datasource"] == source and t["expr"].strip() for t in panel["targets"]), panel["title"]
    text = json.dumps(dashboard)
    used = set(re.findall(r"\$\{?(\w+)", text))
    assert used <= set(variables) | GRAFANA_BUILTINS, used - set(variables) - GRAFANA_BUILTINS


def test_alert_rules_structure() -> None:
    """Each rule is an alert with an expression, a `for` duration, a severity, a summary and a description;
    the labels its annotations name survive its aggregations (without promtool, this is the check)."""
    groups = load_alerts()["groups"]
    assert [g["name"] for g in groups] == ["idempo"]
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == len(names)
    assert {"IdempoLeaseStuck", "IdempoStoreErrorRate", "IdempoReplaysDropped"} <= set(names)
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert isinstance(rule["expr"], str), rule["alert"]
        assert rule["expr"].strip(), rule["alert"]
        assert re.fullmatch(r"(\d+(ms|[smhdwy]))+", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        kept = parse(rule["expr"]).grouping | set(rule["labels"])
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in kept, f"{rule['alert']} names $labels.{label}, which its expression drops"
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text("utf-8"))["tests"]
        for case in test["alert_rule_test"]
    }
    assert tested == set(names), "every alert has a unit test in idempo-alerts.test.yml"


# --- promtool -----------------------------------------------------------------------------------


def promtool() -> str:
    """The promtool to use; skips (or fails, with IDEMPO_REQUIRE_PROMTOOL=1) when there is none."""
    path = os.environ.get("IDEMPO_PROMTOOL") or shutil.which("promtool")
    if path:
        return path
    reason = "promtool not found: set IDEMPO_PROMTOOL=$(scripts/fetch-promtool)"
    if os.environ.get("IDEMPO_REQUIRE_PROMTOOL") == "1":
        pytest.fail(reason + " (IDEMPO_REQUIRE_PROMTOOL=1)")
    pytest.skip(reason)


def run_promtool(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    """`promtool check rules` accepts the rules; `promtool test rules` passes their unit tests."""
    assert f"SUCCESS: {len(alert_rules())} rules found" in run_promtool(
        "check", "rules", ALERTS.name, cwd=ALERTS.parent
    )
    assert "SUCCESS" in run_promtool("test", "rules", ALERT_TESTS.name, cwd=ALERTS.parent)


def test_promtool_parses_the_dashboard_queries(tmp_path: Path) -> None:
    """Every dashboard query, its Grafana variables given example values, is PromQL promtool accepts."""
    rules = []
    for number, (_, expr) in enumerate(dashboard_expressions(load_dashboard())):
        concrete = re.sub(r"\$\{?(\w+)\}?", lambda m: _GRAFANA_EXAMPLES[m.group(1)], expr)
        rules.append({"record": f"idempo:dashboard_query_{number}", "expr": concrete})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), "utf-8")
    assert f"SUCCESS: {len(rules)} rules found" in run_promtool("check", "rules", path.name, cwd=tmp_path)
