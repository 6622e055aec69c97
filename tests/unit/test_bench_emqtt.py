"""``shoal bench``'s emqtt-bench templates, client ids and CONNECT encoding (no sockets)."""

from __future__ import annotations

import io

import pytest

from bench.emqtt import (
    build_parser, client_id, connect_packet, expand, opts_from_args, receive_maximum,
)


@pytest.mark.parametrize("template,expected", [
    ("t/%i", "t/7"),
    ("t/%c/x", "t/host_bench_pub_7/x"),
    ("u/%u/%i", "u/alice/7"),
    ("%i%i", "77"),
    ("100%%/%i", "100%/7"),
    ("keep/%x/%", "keep/%x/%"),
    ("plain/topic", "plain/topic"),
])
def test_expand(template: str, expected: str) -> None:
    assert expand(template, 7, "host_bench_pub_7", "alice") == expected


def test_client_ids_follow_emqtt_bench() -> None:
    assert client_id("pub", 3, "host", False) == "host_bench_pub_3"
    assert client_id("sub", 12, "dev", True) == "dev12"


def test_sequence_numbers_start_after_startnumber() -> None:
    a = build_parser().parse_args(["pub", "-t", "t/%i", "-n", "100", "-c", "2", "-L", "5"])
    o = opts_from_args("pub", a)
    assert (o.start, o.count, o.limit, o.port, o.version) == (100, 2, 5, 1883, 5)


def test_emqtt_bench_flags_parse() -> None:
    a = build_parser().parse_args(
        ["sub", "-h", "broker", "-p", "1999", "-V", "4", "-c", "3", "-i", "5", "-t", "a/%c",
         "-q", "2", "-k", "60", "-C", "false", "-u", "u", "-P", "p", "--prefix", "x",
         "--ifaddr", "127.0.0.1,127.0.0.2"])
    o = opts_from_args("sub", a)
    assert (o.host, o.port, o.version, o.count, o.interval_ms, o.qos, o.keepalive, o.clean,
            o.username, o.password, o.prefix, o.ifaddr) == (
        "broker", 1999, 4, 3, 5.0, 2, 60, False, "u", "p", "x", ["127.0.0.1", "127.0.0.2"])


def test_connect_packet_versions_and_credentials() -> None:
    v311 = connect_packet("c1", 4, 30, True)
    assert v311 == b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x1e\x00\x02c1"
    v31 = connect_packet("c1", 3, 30, True)
    assert v31[4:10] == b"MQIsdp" and v31[10] == 3
    creds = connect_packet("c", 4, 30, False, "u", "pw")
    assert creds[9] == 0xC0  # username + password, no clean session
    assert creds.endswith(b"\x00\x01c\x00\x01u\x00\x02pw")
    v5 = connect_packet("c", 5)
    assert v5[8] == 5 and b"\x21\xff\xff" in v5


def test_receive_maximum_from_connack() -> None:
    # flags, reason, properties: session expiry (4 bytes), assigned id (string), receive max
    props = b"\x11\x00\x00\x00\x3c" + b"\x12\x00\x02id" + b"\x21\x00\x20"
    body = b"\x00\x00" + bytes([len(props)]) + props
    assert receive_maximum(body) == 32
    assert receive_maximum(b"\x00\x00\x00") is None


def _reporter(tmp_path, png: bool):
    from bench.emqtt import Reporter
    a = build_parser().parse_args(["sub", "-t", "t", "-c", "2"])
    o = opts_from_args("sub", a)
    out = io.StringIO()
    rep = Reporter(o, out=out, csv_path=str(tmp_path / "r.csv"),
                   png_path=str(tmp_path / "r.png") if png else None)
    base = {"connected": 2, "conn_ok": 2, "conn_fail": 0, "disconnected": 0, "subscribed": 2,
            "sent": 0, "acked": 0, "ready": 2, "errors": []}
    rep.tick({**base, "received": 100, "lat": [1_000_000, 2_000_000, 3_000_000]})
    rep.tick({**base, "received": 300, "lat": [4_000_000]})
    return rep, out


def test_live_lines_summary_and_csv(tmp_path) -> None:
    rep, out = _reporter(tmp_path, png=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "connected=2" in lines[0] and "recv/s=" in lines[0]
    assert "p50=2.00" in lines[0] and "p99=4.00" in lines[1]
    s = rep.summary({"conn_ok": 2, "conn_fail": 0, "disconnected": 0, "subscribed": 2,
                     "sent": 0, "acked": 0, "received": 300, "errors": [], "lat": []})
    assert s["received"] == 300 and s["latency_samples"] == 4 and s["max_ms"] == 4.0
    rep.write_files()
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0].startswith("t,connected,") and len(rows) == 3


def test_png_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="--png needs matplotlib (pip install matplotlib)")
    rep, _ = _reporter(tmp_path, png=True)
    rep.write_files()
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
