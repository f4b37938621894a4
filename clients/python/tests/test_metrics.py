"""The metrics endpoint read by the official Prometheus Python parsers.

The Rust tests (tests/metrics.rs) assert exact values and run ``promtool
check metrics`` on the Prometheus text format; promtool does not read
OpenMetrics, so this checks both formats with the reference client's
parsers, OpenMetrics with its strict one (it rejects a missing ``# EOF``, a
counter family named with ``_total``, or a malformed float).
"""

import urllib.request
from typing import Dict, List

from conftest import Server, aio_test
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from queueber import aio

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def scrape(server: Server, accept: str = "") -> "tuple[str, str]":
    request = urllib.request.Request(f"http://{server.metrics_addr}/metrics")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def samples(families: list, name: str) -> List[Dict[str, object]]:
    return [dict(s.labels, value=s.value) for f in families for s in f.samples if s.name == name]


@aio_test
async def test_both_formats_parse_and_agree(make_server, queue: str) -> None:
    server = make_server("--metrics-listen", "127.0.0.1:0", shards=2)
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"a", b"b", b"c"])
        lease = await qb.poll(queue, max_items=2, lease_ms=30000)
        await qb.remove(queue, lease.id, [m.id for m in lease][:1])

    content_type, text = scrape(server)
    assert content_type.startswith("text/plain; version=0.0.4")
    prometheus = list(parse_prometheus(text))

    content_type, text = scrape(server, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    openmetrics = list(parse_openmetrics(text))

    kinds = {f.name: f.type for f in openmetrics}
    assert kinds["queueber_messages_added"] == "counter"
    assert kinds["queueber_queue_messages"] == "gauge"
    assert kinds["queueber_request_duration_seconds"] == "histogram"
    # The same families in both (the 0.0.4 parser names counters with _total).
    assert {f.name.removesuffix("_total") for f in prometheus} == {f.name for f in openmetrics}

    mine = {"tenant": "default", "queue": queue}
    for families in (prometheus, openmetrics):
        def value(name: str, **labels: str) -> float:
            want = dict(mine, **labels)
            found = [s["value"] for s in samples(families, name)
                     if all(s.get(k) == v for k, v in want.items())]
            assert len(found) == 1, (name, labels, found)
            return float(found[0])

        assert value("queueber_messages_added_total") == 3
        assert value("queueber_messages_delivered_total") == 2
        assert value("queueber_messages_removed_total") == 1
        assert value("queueber_queue_messages", state="visible") == 1
        assert value("queueber_queue_messages", state="inflight") == 1
        adds = [s for s in samples(families, "queueber_requests_total")
                if s["op"] == "add" and s["code"] == "ok"]
        assert [s["value"] for s in adds] == [1]
        buckets = [s for s in samples(families, "queueber_request_duration_seconds_bucket")
                   if s["op"] == "add"]
        assert buckets[-1]["le"] == "+Inf" and buckets[-1]["value"] == 1
