"""shoal's configuration: one strict, typed structure read from TOML and the environment.

A broker that silently ignores a misspelt key runs with a limit its operator
thinks is changed, so everything here fails loudly: an unknown key, a value of
the wrong type and a value out of range all raise :class:`ConfigError` naming
the key and where it came from (the file, or the environment variable).

Each key is a field of a frozen dataclass whose metadata carries its
documentation (what it does and why its default is what it is) and its bounds.
The same metadata validates instances built in code (``MQTTConfig(...)`` in a
test), drives the loader, and generates ``docs/configuration.md``
(``shoal config docs``), so the code and the reference cannot drift apart.

Precedence, lowest first: the defaults below, the TOML file, then
``SHOAL_<SECTION>__<KEY>`` environment variables.
"""

import difflib
import json
import math
import os
import textwrap
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

__all__ = [
    "AuthConfig",
    "Config",
    "ConfigError",
    "ListenersConfig",
    "LogConfig",
    "MQTTConfig",
    "RuntimeConfig",
    "TcpListenerConfig",
    "TlsListenerConfig",
    "WsListenerConfig",
    "WssListenerConfig",
    "CONFIG_ENV",
    "ENV_PREFIX",
    "env_name",
    "env_overrides",
    "example_toml",
    "load_config",
    "render_docs",
    "to_toml",
]

ENV_PREFIX = "SHOAL_"
ENV_SEPARATOR = "__"
CONFIG_ENV = "SHOAL_CONFIG"

_UINT16 = 65535
_UINT32 = 4294967295
_MQTT_MAX_PACKET = 268435455  # the largest Remaining Length a 4-byte varint can carry


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and its source."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.message = message
        self.key = key
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


# ---------------------------------------------------------------------------
# Field declarations


def _key(default: Any, doc: str, *, lo: int | float | None = None, hi: int | float | None = None,
         above: float | None = None, choices: tuple[str, ...] | None = None,
         unit: str | None = None, zero: str | None = None) -> Any:
    """Declare one configuration key.

    ``doc`` says what the key does and why the default is what it is; ``lo``/``hi``
    are inclusive bounds, ``above`` an exclusive lower bound, ``zero`` what 0 means
    when it is special. Returned as ``Any`` so the dataclass annotation stays the
    field's real type for type checkers.
    """
    meta = {"doc": " ".join(doc.split()), "lo": lo, "hi": hi, "above": above,
            "choices": choices, "unit": unit, "zero": zero}
    return field(default=default, metadata=meta)


def _table(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": " ".join(doc.split())})


# ---------------------------------------------------------------------------
# Sections


def _bind_key(what: str) -> Any:
    return _key(
        "0.0.0.0",
        f"""Address the {what} listener binds. 0.0.0.0 (every IPv4 interface) because a broker
        is a server other hosts and containers connect to; set 127.0.0.1 for a broker reachable
        only from this host (the tests do), or :: for IPv6.""")


def _port_key(default: int, doc: str) -> Any:
    return _key(default, doc, lo=0, hi=_UINT16,
                zero="any free port, chosen by the kernel and reported in `runtime.ready_file` "
                     "(how tests avoid fixed ports)")


def _backlog_key() -> Any:
    return _key(
        1024,
        """Length of the kernel's queue of connections not yet accepted. 1024 rather than
        asyncio's default of 100: when every client reconnects at once (after a restart or a
        network blip) 100 overflows, and each dropped SYN costs that client a retransmission
        timeout of a second or more. The kernel caps it at net.core.somaxconn.""",
        lo=1, hi=_UINT16)


def _proxy_key(tls: bool = False) -> Any:
    extra = (""" The header comes before the TLS handshake (HAProxy passing TLS through in TCP
        mode); TLS then runs in a Python layer over memory buffers rather than in the loop,
        which costs some CPU per record.""" if tls else "")
    return _key(
        False,
        """Expect a PROXY protocol header (v1 text or v2 binary, as HAProxy's send-proxy and
        send-proxy-v2 write) at the start of every connection, and take the client's address
        from it. Off by default: with it on, a connection without the header is closed, and
        anyone who reaches the port directly could claim any address, so turn it on only
        where the balancer is the sole way in.""" + extra)


def _listener_auth_key() -> Any:
    return _key(
        "",
        """The authentication backends this listener asks, comma-separated, in order (e.g.
        "jwt" on a listener for devices with tokens, "builtin" on one for people): each must
        also be named in auth.backends, where it is configured. Empty by default: the
        listener uses the whole auth.backends chain. (A comma-separated string like
        auth.backends, not a TOML array.)""",
        zero="(empty) the global auth.backends chain")


def _listener_anonymous_key() -> Any:
    return _key(
        "inherit",
        """Whether clients without credentials may connect on this listener: allow, deny, or
        inherit mqtt.allow_anonymous (the default, so one switch governs every listener
        until one needs to differ, e.g. anonymous on a loopback TCP listener but not on the
        public TLS one).""",
        choices=("inherit", "allow", "deny"))


def _certfile_key() -> Any:
    return _key(
        "",
        """PEM file with the server's certificate, followed by any intermediate certificates.
        Empty by default: there is no certificate a broker could be trusted with out of the
        box, so a TLS listener is enabled only by an operator who supplies one.""",
        zero="(empty) none; required when the listener is enabled")


def _keyfile_key() -> Any:
    return _key(
        "",
        """PEM file with the private key of certfile.""",
        zero="(empty) the key is read from certfile")


def _cafile_key() -> Any:
    return _key(
        "",
        """PEM file of the certificate authorities whose client certificates are accepted
        (mutual TLS). Needed when verify_client is optional or required.""",
        zero="(empty) no client CA")


def _verify_client_key() -> Any:
    return _key(
        "none",
        """Whether clients present a certificate: none (not asked), optional (asked, checked
        against cafile when sent), required (a client without a valid certificate fails the
        handshake). none by default, as most MQTT deployments authenticate with credentials
        inside MQTT rather than certificates.""",
        choices=("none", "optional", "required"))


def _peer_cert_key() -> Any:
    return _key(
        "none",
        """Take the MQTT username of a client that sends none from its verified certificate:
        cn (the subject's common name), san (its first DNS, email or URI subject alternative
        name) or none. A username the client sends itself wins. none by default; cn or san
        need verify_client optional or required, since an unverified name proves nothing.""",
        choices=("none", "cn", "san"))


def _min_version_key() -> Any:
    return _key(
        "TLSv1.2",
        """Oldest TLS version accepted. TLSv1.2 because TLS 1.0 and 1.1 are deprecated (RFC
        8996) and every maintained MQTT client speaks 1.2; TLSv1.3 refuses older clients.""",
        choices=("TLSv1.2", "TLSv1.3"))


def _ws_path_key() -> Any:
    return _key(
        "/mqtt",
        """HTTP path of the WebSocket endpoint; other paths are answered 404. /mqtt is what
        MQTT.js, paho and EMQX/Mosquitto examples use.""")


def _max_frame_key() -> Any:
    return _key(
        2097152,
        """Largest WebSocket frame accepted, in bytes of payload; a larger one closes the
        connection with 1009 (message too big). 2 MiB so that a client that sends each MQTT
        packet as one frame can send a packet of mqtt.max_packet_size (1 MiB by default) with
        room to spare; frames are not reassembled into messages, so this bounds what one
        connection makes the shard buffer.""",
        lo=126, hi=_MQTT_MAX_PACKET + 16, unit="bytes")


def _max_conn_key() -> Any:
    return _key(
        0,
        """Most connections open at once on this listener across the host: every shard counts
        the connections of all shards (a table the router shares) before admitting one, so
        the limit holds host-wide whichever shard the kernel picks; shards admitting at the
        same instant may pass it by at most N - 1. An excess connection is closed as soon as
        it is accepted, before any byte is read (on TLS and WSS, once the TLS handshake is
        done; on QUIC, when it opens its first stream, with close code 2). 0 by default: the host-wide limits.max_connections already protects memory, and a
        per-listener cap is for sharing a host between transports (say, fewer WebSocket
        browsers than devices).""",
        lo=0, zero="no per-listener limit (limits.max_connections still applies)")


def _conn_rate_key() -> Any:
    return _key(
        0.0,
        """New connections a second this listener accepts across the host; a token bucket per
        shard refills at rate / N with a burst of one second's worth (at least one). An excess
        connection is closed as soon as it is accepted and counted; the log says so at most
        once every 10 s, never once a connection. Unlimited by default: after a restart or a
        network blip every client reconnects at once, and throttling that storm only stretches
        the outage; the backlog and mqtt.connect_timeout already bound what a connection that
        never finishes CONNECT costs. Set it where clients are untrusted.""",
        lo=0.0, hi=1e9, unit="connections per second", zero="unlimited")


def _check_bind(section: Any) -> None:
    if not section.bind.strip():
        p = type(section).section_path
        raise ConfigError(f"{p}.bind: must not be empty", key=f"{p}.bind")


def _check_tls(section: Any) -> None:
    p = type(section).section_path
    if section.enabled and not section.certfile:
        raise ConfigError(f"{p}.certfile: a TLS listener needs a certificate; set certfile "
                          f"(and keyfile) or disable the listener", key=f"{p}.certfile")
    if section.verify_client != "none" and not section.cafile:
        raise ConfigError(f"{p}.cafile: verify_client = {section.verify_client!r} needs the "
                          f"client CA file", key=f"{p}.cafile")
    if section.peer_cert_as_username != "none" and section.verify_client == "none":
        raise ConfigError(f"{p}.peer_cert_as_username: needs verify_client optional or "
                          f"required (an unverified certificate proves no name)",
                          key=f"{p}.peer_cert_as_username")


def _check_ws(section: Any) -> None:
    p = type(section).section_path
    if not section.path.startswith("/"):
        raise ConfigError(f"{p}.path: must start with '/'", key=f"{p}.path")


@dataclass(frozen=True, slots=True)
class TcpListenerConfig:
    section_path: ClassVar[str] = "listeners.tcp"

    enabled: bool = _key(
        True,
        """Serve plain MQTT over TCP. On by default because TCP is the transport every MQTT
        client speaks.""")
    bind: str = _bind_key("TCP")
    port: int = _port_key(
        1883,
        """TCP port. 1883 is the IANA-registered MQTT port, so clients find the broker without
        being told a port.""")
    backlog: int = _backlog_key()
    max_connections: int = _max_conn_key()
    max_connection_rate: float = _conn_rate_key()
    auth: str = _listener_auth_key()
    anonymous: str = _listener_anonymous_key()
    proxy_protocol: bool = _proxy_key()

    def __post_init__(self) -> None:
        _validate(self)
        _check_bind(self)


@dataclass(frozen=True, slots=True)
class TlsListenerConfig:
    section_path: ClassVar[str] = "listeners.tls"

    enabled: bool = _key(
        False,
        """Serve MQTT over TLS. Off by default because it needs a certificate the operator
        supplies (certfile): the embedded defaults must start a broker with no files at all,
        and a self-signed certificate generated on first start would only teach clients to
        skip verification.""")
    bind: str = _bind_key("TLS")
    port: int = _port_key(
        8883,
        """TLS port. 8883 is the IANA-registered port of MQTT over TLS.""")
    backlog: int = _backlog_key()
    max_connections: int = _max_conn_key()
    max_connection_rate: float = _conn_rate_key()
    auth: str = _listener_auth_key()
    anonymous: str = _listener_anonymous_key()
    certfile: str = _certfile_key()
    keyfile: str = _keyfile_key()
    cafile: str = _cafile_key()
    verify_client: str = _verify_client_key()
    peer_cert_as_username: str = _peer_cert_key()
    min_version: str = _min_version_key()
    proxy_protocol: bool = _proxy_key(tls=True)

    def __post_init__(self) -> None:
        _validate(self)
        _check_bind(self)
        _check_tls(self)


@dataclass(frozen=True, slots=True)
class WsListenerConfig:
    section_path: ClassVar[str] = "listeners.ws"

    enabled: bool = _key(
        False,
        """Serve MQTT over WebSocket (binary frames, subprotocol mqtt), for browsers and
        clients behind HTTP-only proxies. Off by default so that a default broker opens only
        the one port every client needs; turn it on where browsers connect.""")
    bind: str = _bind_key("WebSocket")
    port: int = _port_key(
        8083,
        """WebSocket port. 8083 is the port EMQX and most MQTT-over-WebSocket examples use.""")
    backlog: int = _backlog_key()
    max_connections: int = _max_conn_key()
    max_connection_rate: float = _conn_rate_key()
    auth: str = _listener_auth_key()
    anonymous: str = _listener_anonymous_key()
    path: str = _ws_path_key()
    max_frame_size: int = _max_frame_key()
    proxy_protocol: bool = _proxy_key()

    def __post_init__(self) -> None:
        _validate(self)
        _check_bind(self)
        _check_ws(self)


@dataclass(frozen=True, slots=True)
class WssListenerConfig:
    section_path: ClassVar[str] = "listeners.wss"

    enabled: bool = _key(
        False,
        """Serve MQTT over WebSocket over TLS. Off by default for the reasons of both
        [listeners.tls] (it needs a certificate) and [listeners.ws].""")
    bind: str = _bind_key("WSS")
    port: int = _port_key(
        8084,
        """WSS port. 8084 is the port EMQX and most MQTT-over-WSS examples use.""")
    backlog: int = _backlog_key()
    max_connections: int = _max_conn_key()
    max_connection_rate: float = _conn_rate_key()
    auth: str = _listener_auth_key()
    anonymous: str = _listener_anonymous_key()
    path: str = _ws_path_key()
    max_frame_size: int = _max_frame_key()
    certfile: str = _certfile_key()
    keyfile: str = _keyfile_key()
    cafile: str = _cafile_key()
    verify_client: str = _verify_client_key()
    peer_cert_as_username: str = _peer_cert_key()
    min_version: str = _min_version_key()
    proxy_protocol: bool = _proxy_key(tls=True)

    def __post_init__(self) -> None:
        _validate(self)
        _check_bind(self)
        _check_ws(self)
        _check_tls(self)


@dataclass(frozen=True, slots=True)
class QuicListenerConfig:
    section_path: ClassVar[str] = "listeners.quic"

    enabled: bool = _key(
        True,
        """Serve MQTT over QUIC (EMQX 5's conventions: ALPN mqtt, TLS 1.3, the first client
        stream is the control stream, later ones data streams). On by default because QUIC is
        what lets a moving client (Wi-Fi to cellular, NAT rebinding) keep its session without
        a reconnect, and it costs one UDP port. With no certfile it uses a self-signed
        certificate generated once into runtime.data_dir: EMQX's QUIC clients default to
        verify_none, and a client that verifies needs a real certificate configured here.""")
    bind: str = _bind_key("QUIC")
    port: int = _port_key(
        14567,
        """UDP port. 14567 is EMQX's QUIC listener port, so EMQX's QUIC clients (and
        emqtt-bench --quic) find shoal where they find EMQX.""")
    max_connections: int = _max_conn_key()
    max_connection_rate: float = _conn_rate_key()
    auth: str = _listener_auth_key()
    anonymous: str = _listener_anonymous_key()
    certfile: str = _key(
        "",
        """PEM file with the server's certificate (and intermediates). Empty by default: a
        self-signed certificate for the host name is generated into runtime.data_dir on first
        start and kept, so every shard and every restart present the same one.""",
        zero="(empty) a generated self-signed certificate")
    keyfile: str = _keyfile_key()
    idle_timeout: float = _key(
        60.0,
        """Seconds without any packet after which QUIC closes a connection (the smaller of
        this and the client's own value wins). 60 s, as aioquic and MsQuic clients default
        to: long enough for a phone between cells, short enough that the state of a client
        that vanished is reclaimed within a minute. A client whose MQTT keepalive is longer
        must send QUIC PINGs (MsQuic does) or its connection idles out first.""",
        above=0.0, hi=86400.0, unit="seconds")
    steering: str = _key(
        "bpf",
        """How a datagram reaches the shard holding its connection. bpf: the router attaches
        a classic BPF program to the UDP socket group that picks the socket from the
        destination connection id (every id shard k issues has byte0 % N == k), so a client
        whose address changes still reaches its shard; a datagram that still lands on the
        wrong shard (the program could not be attached) is forwarded to its owner over the
        bus. forward: no program; every misrouted datagram is forwarded over the bus (a hop
        more, for kernels that refuse the program). off: neither; the kernel hashes the
        address, so a client whose address changes lands on another shard and its connection
        dies (with one shard, the same as bpf). bpf by default because it is the one that
        keeps migrating clients at no cost per datagram.""",
        choices=("bpf", "forward", "off"))
    max_data_streams: int = _key(
        10,
        """Data streams (client bidirectional streams after the control stream) a connection
        may have open at once; QUIC's stream limit refuses more. 10, EMQX's limit: data
        streams separate independent flows (no head-of-line blocking between them), and a
        handful covers that; each costs a frame reader and an output buffer.""",
        lo=0, hi=1000)
    retry: bool = _key(
        False,
        """Answer a new connection's first packet with a Retry (address validation) before
        spending a handshake on it. Off by default, as in EMQX: it costs every client a
        round trip and QUIC's anti-amplification limit already bounds what a spoofed
        address gets. When on, the Retry hands out a connection id owned by the same shard,
        so the token comes back to the shard that made it (each shard has its own token
        key; nothing is shared). Session tickets (resumption, 0-RTT) are never issued: 0-RTT
        data can be replayed and an MQTT PUBLISH is not idempotent, and a ticket key would
        have to be shared between shards.""")

    def __post_init__(self) -> None:
        _validate(self)
        _check_bind(self)
        if self.keyfile and not self.certfile:
            raise ConfigError(f"{self.section_path}.keyfile: set only together with certfile",
                              key=f"{self.section_path}.keyfile")


@dataclass(frozen=True, slots=True)
class ListenersConfig:
    """One table per transport."""

    section_path: ClassVar[str] = "listeners"

    tcp: TcpListenerConfig = _table(TcpListenerConfig, "Plain MQTT over TCP.")
    tls: TlsListenerConfig = _table(
        TlsListenerConfig, "MQTT over TLS (1.2 or newer), optionally with client certificates.")
    ws: WsListenerConfig = _table(WsListenerConfig, "MQTT over WebSocket.")
    wss: WssListenerConfig = _table(WssListenerConfig, "MQTT over WebSocket over TLS.")
    quic: QuicListenerConfig = _table(
        QuicListenerConfig, "MQTT over QUIC (UDP), compatible with EMQX 5's QUIC listener.")

    def __post_init__(self) -> None:
        _validate(self)
        # A broker with no listener would start, report ready and serve nobody.
        if not any(getattr(getattr(self, f.name), "enabled", False) for f in fields(self)):
            raise ConfigError("listeners: every listener is disabled; enable at least one",
                              key="listeners.tcp.enabled")


@dataclass(frozen=True, slots=True)
class MQTTConfig:
    section_path: ClassVar[str] = "mqtt"

    max_packet_size: int = _key(
        1048576,
        """Largest MQTT packet accepted from a client, in bytes, fixed header included;
        advertised to MQTT 5 clients as Maximum Packet Size. A larger packet is a protocol
        error and closes the connection (MQTT 5: DISCONNECT 0x95 Packet too large). 1 MiB
        bounds the memory one client can make a shard buffer while leaving room for ordinary
        payloads (readings, JSON documents, small images); raise it to move files over MQTT.
        The upper bound is the protocol's own maximum.""",
        lo=1, hi=_MQTT_MAX_PACKET, unit="bytes")
    receive_maximum: int = _key(
        32,
        """How many QoS 1 and QoS 2 PUBLISH packets one client may have unacknowledged towards
        the broker at once; advertised to MQTT 5 clients as Receive Maximum (exceeding it is a
        protocol error, 0x93). 32 keeps a fast publisher pipelined (at a 1 ms round trip that is
        32,000 messages a second per client) while bounding the per-client state a shard holds;
        the protocol default of 65535 would let one client pin far more.""",
        lo=1, hi=_UINT16)
    max_inflight: int = _key(
        32,
        """How many QoS 1 and QoS 2 messages the broker sends one client before it waits for
        acknowledgements. The effective value is the smaller of this and the client's own
        Receive Maximum (MQTT 5; MQTT 3.1.1 clients state none). 32 for the same reason as
        receive_maximum: enough pipelining to hide round trips, little enough that a slow
        client's unacknowledged messages stay small. Messages beyond it wait in the session
        queue (max_queued_messages).""",
        lo=1, hi=_UINT16)
    max_queued_messages: int = _key(
        1000,
        """Messages queued per session while its client is offline or its in-flight window is
        full; further messages for that session are dropped. 1000 absorbs a short disconnect at
        a moderate rate without letting one abandoned session fill the host's memory.""",
        lo=0, zero="no queue: only in-flight messages are kept")
    queue_qos0: bool = _key(
        True,
        """Whether QoS 0 messages are queued for offline persistent sessions too (within
        max_queued_messages). True so that a client that reconnects gets what it missed
        whatever the QoS, as EMQX does by default (the specification allows it); set false to
        queue QoS 1 and 2 only, as Mosquitto does by default.""")
    max_topic_levels: int = _key(
        128,
        """Most levels ('/'-separated parts) a topic name or filter may have; deeper ones are
        refused. Real topic trees rarely go past ten levels; 128 (EMQX's default too) is far
        beyond them and bounds the cost of matching one topic, which grows with depth.""",
        lo=1, hi=_UINT16)
    topic_alias_maximum: int = _key(
        64,
        """Highest topic alias an MQTT 5 client may use towards the broker; advertised as Topic
        Alias Maximum. 64 covers the topics a typical device publishes to while bounding the
        per-connection alias table.""",
        lo=0, hi=_UINT16, zero="topic aliases are disabled")
    max_subscriptions_per_client: int = _key(
        10000,
        """Most subscriptions one session may hold; filters beyond it are refused (SUBACK 0x97
        Quota exceeded on MQTT 5, 0x80 on 3.1.1). 10,000 is far above what devices and services
        use and stops one client from flooding the shared topic index.""",
        lo=0, zero="unlimited")
    max_client_id_length: int = _key(
        256,
        """Longest client identifier accepted, in bytes of UTF-8. MQTT 3.1.1 only promises 23,
        but real clients send UUIDs, hostnames and paths that are longer; 256 accepts those and
        bounds the keys of the session registry. Longer ids are refused at CONNECT (Client
        Identifier not valid).""",
        lo=1, hi=_UINT16, unit="bytes")
    max_keepalive: int = _key(
        65535,
        """Longest keep alive a client may ask for, in seconds. 65535 is the protocol's maximum
        (about 18 hours): by default the client's choice is honoured. Lower it to find dead
        connections sooner; an MQTT 5 client that asks for more is told the lower value through
        Server Keep Alive.""",
        lo=1, hi=_UINT16, unit="seconds")
    server_keep_alive: int = _key(
        0,
        """Keep alive imposed on every MQTT 5 client, sent as Server Keep Alive in CONNACK. 0
        by default so the broker dictates nothing it has no reason to; set it to enforce one
        heartbeat across a fleet. Must not exceed max_keepalive.""",
        lo=0, hi=_UINT16, unit="seconds",
        zero="the client's own value is honoured, capped at max_keepalive")
    max_session_expiry_interval: int = _key(
        604800,
        """Longest time a session is kept after its client disconnects. An MQTT 5 client's
        Session Expiry Interval is capped at this, and an MQTT 3.x client that connects with
        clean_session=0 gets exactly this, since 3.x has no expiry of its own. 604800 (7 days)
        lets a device ride out a long outage while sessions that nobody comes back for, and
        their queues, are eventually freed. 4294967295 means never expire (MQTT 5's value
        for that).""",
        lo=0, hi=_UINT32, unit="seconds",
        zero="sessions end when their connection does, whatever the client asks")
    maximum_qos: int = _key(
        2,
        """Highest QoS the broker accepts for publishes and grants to subscriptions; advertised
        to MQTT 5 clients as Maximum QoS. 2 supports every MQTT feature; lower it only to
        refuse the cost of QoS 2's four-packet exchange.""",
        lo=0, hi=2)
    retain_available: bool = _key(
        True,
        """Whether retained messages are stored and delivered; advertised as Retain Available.
        True because retained messages are how most deployments publish 'last known state'.""")
    max_retained_messages: int = _key(
        1000000,
        """Most retained messages stored broker-wide; when the store is full a retained
        message on a new topic is not stored (existing topics are still updated and
        cleared). 1,000,000 holds any ordinary deployment's state in a few hundred MB at
        typical payload sizes, and bounds memory against a client retaining on random
        topics.""",
        lo=0, zero="unlimited")
    wildcard_subscription_available: bool = _key(
        True,
        """Whether filters with + and # are accepted; advertised as Wildcard Subscription
        Available. True: wildcards are ordinary MQTT and the topic index is built for them.""")
    subscription_identifier_available: bool = _key(
        True,
        """Whether MQTT 5 Subscription Identifiers are supported; advertised as Subscription
        Identifier Available. True: they cost one integer per subscription and spare clients
        matching topics again to dispatch a message.""")
    shared_subscription_available: bool = _key(
        True,
        """Whether $share/<group>/<filter> subscriptions are supported; advertised as Shared
        Subscription Available. True: shared subscriptions are how consumers of an MQTT stream
        split the load between them.""")
    shared_subscription_strategy: str = _key(
        "round_robin",
        """How a message for a shared subscription picks one member of the group: round_robin
        (each member in turn) or random. round_robin by default because it spreads load evenly
        even over a few messages, and is deterministic, which tests rely on.""",
        choices=("round_robin", "random"))
    allow_anonymous: bool = _key(
        True,
        """Whether a client that sends no username may connect. True so that a broker started
        from a fresh checkout works with any client; set false to refuse clients that connect
        without a username (CONNACK 0x87 Not authorized; MQTT 3.1.1: return code 5). Clients
        that send a username are checked by the [auth] backends.""")
    allow_zero_length_clientid: bool = _key(
        True,
        """Whether a client may connect with an empty client id and have the broker assign one
        (MQTT 5 returns it as Assigned Client Identifier; MQTT 3.1.1 allows it only with
        clean_session=1). True because the specification expects servers to support it and
        many client libraries rely on it.""")
    connect_timeout: float = _key(
        10.0,
        """Seconds a new connection has to send a complete CONNECT before it is closed. 10 s is
        generous for a slow link and a TLS handshake, yet soon frees the file descriptors held
        by port scanners and half-open connections.""",
        above=0.0, hi=3600.0, unit="seconds")
    sys_interval: float = _key(
        10.0,
        """Seconds between updates of the $SYS statistics topics. 10 s, as Mosquitto: fresh
        enough for a dashboard, rare enough to cost nothing.""",
        lo=0.0, hi=86400.0, unit="seconds", zero="no $SYS topics are published")

    def __post_init__(self) -> None:
        _validate(self)
        if self.server_keep_alive > self.max_keepalive:
            raise ConfigError(
                f"mqtt.server_keep_alive: {self.server_keep_alive} exceeds mqtt.max_keepalive "
                f"({self.max_keepalive}); a broker cannot impose more than it allows",
                key="mqtt.server_keep_alive")


AUTH_BACKENDS = ("builtin", "http", "postgresql", "mysql", "jwt")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    section_path: ClassVar[str] = "auth"

    backends: str = _key(
        "",
        """Authentication chain: backends asked in order, comma-separated, for a client that
        sends a username. The first backend that knows the username decides; a username no
        backend knows is refused (CONNACK 0x86 Bad user name or password; MQTT 3.1.1: return
        code 4). Backends: builtin, the user store in runtime.data_dir managed with `shoal
        user add|del|list` (it needs no server; it also offers MQTT 5 enhanced authentication
        with SCRAM-SHA-256 from the verifiers `shoal user add` stores), http (see http_url), postgresql (see
        pgsql_query), mysql (MySQL or MariaDB, see mysql_query) and jwt (a signed JSON Web
        Token in the password field, see jwt_secret). Empty by default so that a broker started from a fresh checkout accepts
        any client: usernames and passwords are then not checked while
        mqtt.allow_anonymous is true, and refused while it is false (nothing could verify
        them). Clients without a username are governed by mqtt.allow_anonymous either
        way.""",
        zero="(empty) no authentication: credentials are not checked")
    users_file: str = _key(
        "users.json",
        """The builtin backend's user file, relative to runtime.data_dir unless absolute.
        Every shard reads it and notices changes without a restart (see reload_interval).""")
    credential_cache_size: int = _key(
        10000,
        """Credentials a shard remembers after verifying them, so a reconnecting client does
        not pay for a password hash again. An entry is a username, a keyed digest of the
        password (never the password itself) and the stored hash it matched, so it dies
        with a password change. 10,000 covers the clients one shard usually serves; beyond
        it the oldest entries go, which costs only a re-verification.""",
        lo=0, zero="nothing is cached: every CONNECT hashes the password")
    hash_workers: int = _key(
        2,
        """Threads per shard that verify password hashes. A scrypt check takes tens of
        milliseconds of CPU, which would stall every connection of the shard if run on its
        event loop; hashlib releases the GIL, so the threads run beside the loop. 2 lets a
        reconnect storm proceed while leaving the core mostly to the loop (shards usually run
        one per core).""",
        lo=1, hi=64)
    http_url: str = _key(
        "",
        """The http backend's endpoint. Each CONNECT with a username not answered from the
        cache is POSTed to it as JSON {"clientid", "username", "password", "peerhost"}, as
        EMQX's HTTP authenticator does; a 200 answer {"result": "allow"} (or a 204) accepts,
        {"result": "deny"} refuses (0x86), {"result": "ignore"}, any other status, a timeout
        or an unreachable server pass the question to the next backend.""",
        zero="(empty) required when backends names http")
    http_timeout: float = _key(
        5.0,
        """Seconds the http backend waits for an answer. 5 s: longer than any healthy
        service takes, short enough that a hung one does not hold clients past
        mqtt.connect_timeout (10 s).""",
        above=0.0, hi=60.0, unit="seconds")
    http_workers: int = _key(
        4,
        """Threads per shard that wait on the http backend (the shard's loop never does).
        4 lets that many requests run at once per shard; a slow service queues the rest
        rather than taking the hash threads with it.""",
        lo=1, hi=256)
    http_cache_ttl: float = _key(
        60.0,
        """Seconds an accepted answer from the http backend is reused for the same client
        id, username and password (within credential_cache_size entries). 60 s spares the
        service a reconnect storm while a revoked credential stops working within a
        minute.""",
        lo=0.0, hi=86400.0, unit="seconds", zero="every CONNECT asks the service")
    pgsql_host: str = _key(
        "127.0.0.1",
        """The postgresql backend's server: a host name or address, or the directory of its
        Unix socket when it starts with '/'. 127.0.0.1 because a database for broker users
        usually runs beside the broker.""")
    pgsql_port: int = _key(
        5432,
        """The postgresql backend's TCP port (and the number in its socket's name). 5432 is
        PostgreSQL's default.""",
        lo=1, hi=_UINT16)
    pgsql_database: str = _key(
        "mqtt",
        """The postgresql backend's database. 'mqtt', as in EMQX's examples.""")
    pgsql_user: str = _key(
        "mqtt",
        """The role the postgresql backend connects as; give it SELECT on the user table
        only.""")
    pgsql_password: str = _key(
        "",
        """That role's password; prefer the SHOAL_AUTH__PGSQL_PASSWORD environment variable
        to writing it in a file.""",
        zero="(empty) no password (trust or peer authentication)")
    pgsql_query: str = _key(
        "SELECT password_hash FROM mqtt_user WHERE username = :username LIMIT 1",
        """The query that finds a user's password hash: its first column of its first row is
        a hash in shoal's format (`shoal user hash` prints one to insert). :username and
        :clientid are bound as parameters, never spliced into the text. No row: the next
        backend is asked. The default reads a table mqtt_user(username, password_hash).""")
    pgsql_acl_query: str = _key(
        "",
        """Authorization rules from PostgreSQL: a query returning rows with columns
        permission (allow/deny), action (publish/subscribe/all) and topic (a filter, with
        %u/%c placeholders, or 'eq FILTER' for the filter itself), e.g. SELECT permission,
        action, topic FROM mqtt_acl WHERE username = :username ORDER BY id. :username and
        :clientid are bound as in pgsql_query. It runs once per CONNECT on the database
        threads (never per PUBLISH); the rows, in the order returned, are asked before the
        ACL file with the same first-match rules, and none matching falls through to the
        file, then acl_no_match. A failing query is logged and counts as no rows.""",
        zero="(empty) no rules from PostgreSQL")
    pgsql_workers: int = _key(
        2,
        """Database connections per shard, each on its own thread (the loop never waits on
        the database). 2 keeps a slow query from holding every CONNECT while costing the
        server few connections per broker core.""",
        lo=1, hi=64)
    mysql_host: str = _key(
        "127.0.0.1",
        """The mysql backend's server (MySQL or MariaDB): a host name or address, or the path
        of its Unix socket when it starts with '/'. 127.0.0.1 because a database for broker
        users usually runs beside the broker.""")
    mysql_port: int = _key(
        3306,
        """The mysql backend's TCP port. 3306 is MySQL's and MariaDB's default.""",
        lo=1, hi=_UINT16)
    mysql_database: str = _key(
        "mqtt",
        """The mysql backend's database. 'mqtt', as in EMQX's examples.""")
    mysql_user: str = _key(
        "mqtt",
        """The account the mysql backend connects as; give it SELECT on the user table
        only.""")
    mysql_password: str = _key(
        "",
        """That account's password; prefer the SHOAL_AUTH__MYSQL_PASSWORD environment
        variable to writing it in a file.""",
        zero="(empty) no password (e.g. unix_socket authentication)")
    mysql_query: str = _key(
        "SELECT password_hash FROM mqtt_user WHERE username = :username LIMIT 1",
        """The query that finds a user's password hash, as pgsql_query: first column of the
        first row, in shoal's format; :username and :clientid are bound as parameters. The
        default reads a table mqtt_user(username, password_hash).""")
    mysql_acl_query: str = _key(
        "",
        """Authorization rules from MySQL/MariaDB, as pgsql_acl_query: rows of permission,
        action and topic fetched once per CONNECT, asked before the ACL file.""",
        zero="(empty) no rules from MySQL")
    mysql_workers: int = _key(
        2,
        """Database connections per shard, each on its own thread, as pgsql_workers.""",
        lo=1, hi=64)
    jwt_secret: str = _key(
        "",
        """The jwt backend's HS256 shared secret (prefer the SHOAL_AUTH__JWT_SECRET environment
        variable to writing it in a file). Exactly one of jwt_secret, jwt_public_key_file and
        jwt_jwks_file is set when backends names jwt; the key's kind fixes the algorithm
        (a secret: HS256 only; a public key or JWKS: RS256 only), so a token cannot choose
        'none' or sign with HS256 over the public key (algorithm confusion).""",
        zero="(empty) no shared secret")
    jwt_public_key_file: str = _key(
        "",
        """The jwt backend's RSA public key (PEM) for RS256 tokens, relative to
        runtime.data_dir unless absolute; re-read when it changes (see reload_interval).""",
        zero="(empty) no public key file")
    jwt_jwks_file: str = _key(
        "",
        """A JSON Web Key Set file ({"keys": [...]}) of RSA public keys for RS256 tokens,
        relative to runtime.data_dir unless absolute; a token's header kid picks the key (a
        token without kid is accepted only when the set holds one key). Re-read when it
        changes, so keys rotate without a restart.""",
        zero="(empty) no JWKS file")
    jwt_from: str = _key(
        "password",
        """Which CONNECT field carries the token: password, EMQX's default (the username then
        stays the client's name for ACLs and logs), or username. A client that sends nothing
        in that field, or something that is not a JWT, is passed to the next backend; a JWT
        that fails verification is refused (0x86).""",
        choices=("password", "username"))
    jwt_leeway: float = _key(
        5.0,
        """Seconds of clock skew allowed when checking a token's exp and nbf claims. 5 s
        covers hosts kept in step by NTP without extending a token's life noticeably.""",
        lo=0.0, hi=3600.0, unit="seconds", zero="exp and nbf are checked exactly")
    jwt_require_exp: bool = _key(
        True,
        """Refuse tokens without an exp claim. On by default: a token that never expires is a
        password that cannot be changed.""")
    jwt_issuer: str = _key(
        "",
        """When set, a token's iss claim must equal it.""",
        zero="(empty) iss is not checked")
    jwt_audience: str = _key(
        "",
        """When set, a token's aud claim must name it.""",
        zero="(empty) aud is not checked (a token with an aud claim is still accepted)")
    jwt_acl_claim: str = _key(
        "acl",
        """The token claim holding the client's ACL, as EMQX reads it: either
        {"pub": [...], "sub": [...], "all": [...]} (topics allowed) or a list of
        {"permission", "action", "topic"} rules. Its rules are asked first (before any
        database rows and the ACL file), first match wins, none matching falls through;
        %u/%c placeholders work. A token without the claim adds no rules.""",
        zero="(empty) no claim is read")
    reload_interval: float = _key(
        1.0,
        """How often, at most, a shard checks whether the user, ACL and banned files changed
        (one stat each). 1 s makes `shoal user add` take effect at once for a person and
        costs nothing measurable.""",
        above=0.0, hi=3600.0, unit="seconds")
    acl_file: str = _key(
        "",
        """Authorization rules (see docs/auth.md for the syntax: allow/deny, user, client id,
        IP/CIDR, %u/%c placeholders, first match wins), relative to runtime.data_dir unless
        absolute. Empty by default: every client may publish and subscribe to everything
        (but $SYS, which is the broker's), and the publish path does no ACL work at all. A
        missing or invalid file at start-up stops the broker; an invalid edit later is logged
        and the previous rules stay.""",
        zero="(empty) no ACL: everything is allowed")
    acl_no_match: str = _key(
        "allow",
        """What happens when no ACL rule applies. allow, EMQX's default: an ACL file then
        lists what is forbidden and what is granted in exceptions; deny for a whitelist
        (Mosquitto's behaviour with an ACL file).""",
        choices=("allow", "deny"))
    acl_deny_action: str = _key(
        "ignore",
        """What a denied PUBLISH does to its connection. ignore (EMQX's default): the message
        is dropped; MQTT 5 QoS 1/2 publishers get PUBACK/PUBREC 0x87 Not authorized, MQTT
        3.1.1 ones are acknowledged as usual since 3.1.1 has no negative acknowledgement.
        disconnect: the connection is closed (MQTT 5: DISCONNECT 0x87) so a misbehaving
        client notices.""",
        choices=("ignore", "disconnect"))
    acl_cache_size: int = _key(
        100000,
        """ACL decisions a shard remembers, per (connection, action, topic), so the rules are
        walked once per distinct topic rather than per message. 100,000 decisions take a few
        MB and cover the working set of a shard's publishers; when full the oldest go. Emptied
        whenever the ACL file changes.""",
        lo=0, zero="no cache: the rules are walked for every PUBLISH")
    banned_file: str = _key(
        "banned.json",
        """Banned clients, by client id, username or address/CIDR, with an optional end
        time, managed with `shoal ban add|del|list`; relative to runtime.data_dir unless
        absolute. A banned client's CONNECT is refused (0x8A Banned; MQTT 3.1.1: return code
        5).""")
    flapping_max_count: int = _key(
        0,
        """Flapping detection: a client id that disconnects this many times within
        flapping_window is banned for flapping_ban_time. 0 (off) by default, as in EMQX, since
        a client stuck in a reconnect loop is usually a bug to fix rather than an attack;
        15, EMQX's suggested value, is a good start when enabling it. Counted over the whole
        host by the router, whichever shards the client's connections land on.""",
        lo=0, hi=_UINT16, zero="flapping detection is off")
    flapping_window: float = _key(
        60.0,
        """The window over which disconnects are counted, from the first one. 60 s, EMQX's
        default: a well-behaved client does not reconnect 15 times a minute.""",
        above=0.0, hi=86400.0, unit="seconds")
    flapping_ban_time: float = _key(
        300.0,
        """How long a flapping client id is refused (CONNACK 0x8A). 5 minutes, EMQX's
        default: long enough to relieve the broker, short enough that a fixed client comes
        back on its own.""",
        above=0.0, hi=86400.0 * 30, unit="seconds")
    flapping_max_tracked: int = _key(
        100000,
        """Most client ids the router (and each shard) tracks for flapping at once (counting
        or banned); beyond it the oldest entries are forgotten. Bounds the memory a flood of
        made-up client ids can take; 100,000 entries are a few tens of MB.""",
        lo=1)

    def __post_init__(self) -> None:
        _validate(self)
        for name in self.backend_list():
            if name not in AUTH_BACKENDS:
                raise ConfigError(f"auth.backends: unknown backend {name!r} (known: "
                                  f"{', '.join(AUTH_BACKENDS)})", key="auth.backends")
        if "http" in self.backend_list() and not self.http_url:
            raise ConfigError("auth.http_url: must be set when auth.backends names http",
                              key="auth.http_url")
        if "jwt" in self.backend_list():
            keys = [k for k in ("jwt_secret", "jwt_public_key_file", "jwt_jwks_file")
                    if getattr(self, k)]
            if len(keys) != 1:
                raise ConfigError("auth.jwt_secret: set exactly one of jwt_secret, "
                                  "jwt_public_key_file and jwt_jwks_file when auth.backends "
                                  f"names jwt (set: {', '.join(keys) or 'none'})",
                                  key="auth.jwt_secret")
        if self.http_url and not self.http_url.startswith(("http://", "https://")):
            raise ConfigError(f"auth.http_url: {self.http_url!r} is not an http(s) URL",
                              key="auth.http_url")

    def backend_list(self) -> list[str]:
        return [b.strip() for b in self.backends.split(",") if b.strip()]


@dataclass(frozen=True, slots=True)
class LogConfig:
    section_path: ClassVar[str] = "log"

    level: str = _key(
        "INFO",
        """Least severe level logged: DEBUG, INFO, WARNING or ERROR (any case; stored upper
        case). INFO is for events (start, stop, listeners, errors), never for per-packet work,
        which would cost more than the broker's own work on each packet; DEBUG is for
        development.""",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        if isinstance(self.level, str):
            object.__setattr__(self, "level", self.level.upper())
        _validate(self)


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    section_path: ClassVar[str] = "runtime"

    loop: str = _key(
        "uvloop",
        """Event loop: uvloop, the faster one and what shoal is tuned and benchmarked with, or
        asyncio, the standard library's, which tells a uvloop problem from a shoal one (the
        tests run under both).""",
        choices=("uvloop", "asyncio"))
    ready_file: str = _key(
        "",
        """When set, the broker writes a JSON document to this path once every listener is
        bound, atomically (a temporary file renamed into place), so a reader never sees half
        of it: {"pid": ..., "listeners": {"tcp": {"host": ..., "port": ...}}}. Under a router
        it is the router that writes it, once every shard is serving, adding "workers": N and
        "shards": {"0": pid, ...}. Empty by default because only tests and scripts need it;
        with port = 0 it is how they learn the port.""",
        zero="(empty) no ready file is written")
    data_dir: str = _key(
        "var/data",
        """Directory for the broker's persistent state. A relative path is taken from the
        working directory, which supervisor.conf sets to the checkout, so by default state
        lives in var/ beside the logs, which git ignores.""")
    hung_shard_timeout: float = _key(
        10.0,
        """Seconds without a heartbeat (shards send one every second) after which the router
        kills a shard so that supervisord restarts it: supervisord notices a process that
        exits, not one whose loop is stuck. 10 s is far above any legitimate pause of a
        shard's loop (loading a large store at start, a long garbage collection), and a hung
        shard's clients are back on a restarted one within seconds of it.""",
        lo=1.0, hi=3600.0, unit="seconds")

    def __post_init__(self) -> None:
        _validate(self)
        if not self.data_dir.strip():
            raise ConfigError("runtime.data_dir: must not be empty", key="runtime.data_dir")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    section_path: ClassVar[str] = "limits"

    max_connections: int = _key(
        100000,
        """Most client connections open at once on the host, over every listener, counted
        host-wide as for the listeners' max_connections (at most N - 1 over when N shards
        admit at the same instant). An excess connection is closed as soon as it is accepted.
        100,000 because memory is what it protects: an idle connection costs a shard about
        2 kB of RSS (transport, protocol, session; 3,000 idle connections measured) plus the
        kernel's socket buffers (a few kB idle, up to the TCP buffer sizes busy), so 100,000
        is about 0.5-2 GB, which a broker host has, while an unbounded count ends in the OOM
        killer taking every client down at once. Raise it with the memory (and
        RLIMIT_NOFILE) of a bigger host.""",
        lo=0, zero="unlimited")
    message_rate: float = _key(
        0.0,
        """PUBLISH packets a second one client may send. A token bucket per connection with a
        burst of one second's worth (at least one); a client over it is not disconnected: the
        broker stops reading its socket until the bucket has refilled (back-pressure, as EMQX
        does), so TCP slows the client down. Unlimited by default: memory is already bounded
        (the shard reads no faster than it can forward, slow readers have bounded queues), and
        what rate is fair depends on the deployment; a default would silently throttle
        legitimate fast publishers such as gateways and bridges.""",
        lo=0.0, hi=1e9, unit="messages per second", zero="unlimited")
    byte_rate: float = _key(
        0.0,
        """Bytes a second one client may send (every packet, counted as read from the socket).
        A token bucket per connection with a burst of one second's worth; over it, the broker
        stops reading that client until the bucket has refilled, as for message_rate. Unlimited
        by default for the same reason as message_rate.""",
        lo=0.0, hi=1e12, unit="bytes per second", zero="unlimited")

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, slots=True)
class Config:
    section_path: ClassVar[str] = ""

    listeners: ListenersConfig = _table(
        ListenersConfig, "Where clients connect: one table per transport.")
    mqtt: MQTTConfig = _table(
        MQTTConfig,
        "Protocol limits and features. Every limit is explicit so that no client can make a "
        "shard hold unbounded state.")
    limits: LimitsConfig = _table(
        LimitsConfig,
        "Overload protection: connection counts and per-client rates. Per-listener connection "
        "limits are keys of each listener's table.")
    auth: AuthConfig = _table(
        AuthConfig,
        "Authentication, authorization (ACL), banned clients and flapping detection.")
    log: LogConfig = _table(LogConfig, "Logging.")
    runtime: RuntimeConfig = _table(RuntimeConfig, "How the process runs.")

    def __post_init__(self) -> None:
        _validate(self)
        chain = self.auth.backend_list()
        for f in fields(self.listeners):
            table = getattr(self.listeners, f.name)
            for name in listener_backends(table) or ():
                if name not in chain:
                    raise ConfigError(
                        f"listeners.{f.name}.auth: backend {name!r} is not in auth.backends "
                        f"({self.auth.backends or 'empty'}); configure it there first",
                        key=f"listeners.{f.name}.auth")


def listener_backends(table: Any) -> list[str] | None:
    """A listener's own authentication chain, None when it uses auth.backends."""
    names = [b.strip() for b in table.auth.split(",") if b.strip()]
    return names or None


# ---------------------------------------------------------------------------
# Validation


_TYPE_NAMES: dict[type, str] = {bool: "a boolean", int: "an integer", float: "a number",
                                str: "a string"}


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string",
            dict: "table", list: "array"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if kind != "table" else "a table"


def _ftype(f: Field[Any]) -> type:
    """A field's type as a class: this module never uses string annotations."""
    tp = f.type
    if not isinstance(tp, type):  # pragma: no cover - string annotation
        raise TypeError(f"{f.name}: annotation {tp!r} is not a class")
    return tp


def _is_section(tp: type) -> bool:
    return is_dataclass(tp)


def _check_type(key: str, tp: type, value: Any) -> Any:
    """Return ``value`` as ``tp`` (ints widen to float) or raise; bool is never an int here."""
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}", key=key)
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a field of a type this module does not know is a bug here
        raise TypeError(f"{key}: unsupported field type {tp!r}")
    if not ok:
        raise ConfigError(f"{key}: expected {_TYPE_NAMES[tp]}, got {_describe(value)}", key=key)
    return value


def _check_bounds(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}", key=key)
    lo, hi, above = meta.get("lo"), meta.get("hi"), meta.get("above")
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (
            above is not None and value <= above):
        raise ConfigError(f"{key}: {value!r} is out of range ({_range_text(meta)})", key=key)


def _range_text(meta: Mapping[str, Any]) -> str:
    lo, hi, above = meta.get("lo"), meta.get("hi"), meta.get("above")
    if above is not None:
        low = f"> {above:g}"
        return f"{low} and <= {hi:g}" if hi is not None else low
    if lo is not None and hi is not None:
        return f"{lo:g} to {hi:g}" if isinstance(lo, float) else f"{lo} to {hi}"
    if lo is not None:
        return f">= {lo:g}" if isinstance(lo, float) else f">= {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


def _validate(section: Any) -> None:
    prefix = type(section).section_path
    for f in fields(section):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(section, f.name)
        tp = _ftype(f)
        if _is_section(tp):
            if not isinstance(value, tp):
                raise ConfigError(f"{key}: expected a {tp.__name__}, got {_describe(value)}",
                                  key=key)
            continue
        checked = _check_type(key, tp, value)
        if checked is not value:
            object.__setattr__(section, f.name, checked)
        _check_bounds(key, checked, f.metadata)


# ---------------------------------------------------------------------------
# Loading


def _schema(cls: type) -> dict[str, Field[Any]]:
    return {f.name: f for f in fields(cls)}


def _unknown(key: str, name: str, known: dict[str, Field[Any]], source: str) -> ConfigError:
    section = key.rpartition(".")[0]
    where = f"[{section}]" if section else "the top level"
    hint = difflib.get_close_matches(name, list(known), n=1)
    msg = f"unknown key {key!r}"
    msg += f" (did you mean {hint[0]!r}?)" if hint else ""
    msg += f"; known keys in {where}: {', '.join(known)}"
    return ConfigError(msg, key=key, source=source)


def _read_file(cls: type, table: Mapping[str, Any], prefix: str, source: str,
               values: dict[str, Any], origins: dict[str, str]) -> None:
    known = _schema(cls)
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        f = known.get(name)
        if f is None:
            raise _unknown(key, name, known, source)
        if _is_section(_ftype(f)):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table [{key}], got {_describe(value)}",
                                  key=key, source=source)
            _read_file(_ftype(f), value, key, source, values, origins)
            continue
        try:
            values[key] = _check_type(key, _ftype(f), value)
        except ConfigError as e:
            raise ConfigError(e.message, key=key, source=source) from None
        origins[key] = source


_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def _parse_env(key: str, tp: type, text: str, source: str) -> Any:
    raw = text.strip()
    try:
        if tp is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(raw, 10)
        if tp is float:
            return _check_type(key, float, float(raw))
    except ValueError:
        want = "true/false/1/0/yes/no" if tp is bool else _TYPE_NAMES[tp]
        raise ConfigError(f"{key}: expected {want}, got {text!r}", key=key,
                          source=source) from None
    except ConfigError as e:
        raise ConfigError(e.message, key=key, source=source) from None
    return text  # str: taken verbatim, spaces included


def env_overrides(env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """The (variable, value) pairs of ``env`` that are configuration overrides, sorted.

    Only ``SHOAL_*`` names containing ``__`` count, so ``SHOAL_CONFIG`` and the test
    suite's ``SHOAL_TEST_BROKER`` are not mistaken for keys.
    """
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and ENV_SEPARATOR in name:
            yield name, env[name]


def _read_env(env: Mapping[str, str], values: dict[str, Any], origins: dict[str, str]) -> None:
    for name, text in env_overrides(env):
        source = f"environment variable {name}"
        parts = name[len(ENV_PREFIX):].lower().split(ENV_SEPARATOR)
        cls: type = Config
        prefix = ""
        for i, part in enumerate(parts):
            known = _schema(cls)
            key = f"{prefix}.{part}" if prefix else part
            f = known.get(part)
            if f is None:
                raise _unknown(key, part, known, source)
            last = i == len(parts) - 1
            if _is_section(_ftype(f)):
                if last:
                    raise ConfigError(f"{key}: is a table, not a key; name one of its keys "
                                      f"({', '.join(_schema(_ftype(f)))})",
                                      key=key, source=source)
                cls, prefix = _ftype(f), key
                continue
            if not last:
                raise ConfigError(f"{key}: is a key, not a table", key=key, source=source)
            values[key] = _parse_env(key, _ftype(f), text, source)
            origins[key] = source


def _build(cls: type, prefix: str, values: Mapping[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if _is_section(_ftype(f)):
            kwargs[f.name] = _build(_ftype(f), key, values)
        elif key in values:
            kwargs[f.name] = values[key]
    return cls(**kwargs)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"configuration path is a directory: {path}") from None
    except PermissionError:
        raise ConfigError(f"configuration file not readable: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", source=path) from None


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Read the configuration: defaults, then the TOML file, then environment overrides.

    ``path`` None means ``env["SHOAL_CONFIG"]`` if set and non-empty, else defaults only.
    ``env`` defaults to ``os.environ``.
    """
    if env is None:
        env = os.environ
    if path is None:
        path = env.get(CONFIG_ENV) or None
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        source = os.fspath(path)
        _read_file(Config, _read_toml(source), "", source, values, origins)
    _read_env(env, values, origins)
    try:
        config: Config = _build(Config, "", values)
    except ConfigError as e:
        # Range and cross-key checks run in the dataclasses, which do not know where a value
        # came from; name the source here so the operator knows what to edit.
        source = origins.get(e.key or "", "defaults" if path is None else os.fspath(path))
        raise ConfigError(e.message, key=e.key, source=source) from None
    return config


# ---------------------------------------------------------------------------
# Rendering: TOML for `shoal config show`, Markdown for docs/configuration.md


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {value!r} as TOML")  # pragma: no cover


def _sections(cls: type, prefix: str = "") -> Iterator[tuple[str, type, list[Field[Any]]]]:
    """Each table in document order as (dotted name, class, its scalar fields)."""
    scalars = [f for f in fields(cls) if not _is_section(_ftype(f))]
    if prefix and scalars:
        yield prefix, cls, scalars
    for f in fields(cls):
        if _is_section(_ftype(f)):
            yield from _sections(_ftype(f), f"{prefix}.{f.name}" if prefix else f.name)


def _lookup(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def to_toml(config: Config, *, comments: bool = False) -> str:
    """The configuration as a TOML document that :func:`load_config` reads back to ``config``."""
    out: list[str] = []
    for name, _cls, scalars in _sections(Config):
        if out:
            out.append("")
        out.append(f"[{name}]")
        section = _lookup(config, name)
        for f in scalars:
            if comments:
                out.append("")
                out.extend(textwrap.wrap(_summary(f), 88, initial_indent="# ",
                                         subsequent_indent="# "))
                out.extend(textwrap.wrap(f.metadata["doc"], 88, initial_indent="# ",
                                         subsequent_indent="# "))
            out.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
    return "\n".join(out) + "\n"


def _type_name(tp: type) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string"}[tp]


def _summary(f: Field[Any]) -> str:
    """One line: type, default, allowed values."""
    meta = f.metadata
    parts = [_type_name(_ftype(f)), f"default {_toml_value(f.default)}"]
    if meta.get("choices"):
        parts.append("one of " + ", ".join(meta["choices"]))
    rng = _range_text(meta)
    if rng:
        parts.append(f"range {rng}")
    if meta.get("unit"):
        parts.append(f"in {meta['unit']}")
    if meta.get("zero"):
        parts.append(f"0 = {meta['zero']}" if _ftype(f) is not str else meta["zero"])
    return "; ".join(parts)


def env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.upper().replace(".", ENV_SEPARATOR)


_DOCS_HEADER = """\
# Configuration

<!-- Generated by `shoal config docs` from shards/config.py: edit the code, then regenerate
     with `shoal config docs > docs/configuration.md`. A unit test fails when they differ. -->

shoal reads one strict, typed configuration. Precedence, lowest first:

1. the defaults listed below: a broker started with no configuration at all
   (`supervisord -c supervisor.conf` from a fresh checkout) uses them;
2. a TOML file: `--config FILE`, or else the file named by the environment variable
   `SHOAL_CONFIG` (unset or empty: no file);
3. environment variables `SHOAL_<SECTION>__<KEY>`, one per key, for example
   `SHOAL_MQTT__MAX_INFLIGHT=64` or, for a nested table, `SHOAL_LISTENERS__TCP__PORT=1884`.
   Only names that start with `SHOAL_` **and** contain `__` are overrides, so `SHOAL_CONFIG`
   is not one. Values are parsed by the key's type: booleans as
   `true`/`false`/`1`/`0`/`yes`/`no`, integers, floats, and strings taken verbatim.

Nothing is ignored silently. An unknown key (in the file or in an override), a value of the
wrong type (`port = "1883"`, `enabled = 1`) and a value out of range all stop the broker with
an error naming the key and the file or variable it came from. Check a file without starting
anything with `shoal config check FILE`; see the effective configuration, overrides applied,
with `shoal config show [--config FILE]`. `shoal.example.toml` in the checkout lists every key
with its default.

Limits are per shard process unless a key says otherwise. The number of shards is not a
key here: it is `numprocs` in supervisor.conf's `[program:workers]` (one per core is the
usual tuning), and the router learns it from the shards as they join.
"""


def render_docs() -> str:
    """The Markdown reference of every key, as committed in docs/configuration.md."""
    out = [_DOCS_HEADER]
    for name, cls, scalars in _sections(Config):
        out.append(f"## [{name}]\n")
        parent, _, leaf = name.rpartition(".")
        owner = _lookup_class(parent)
        doc = next(f for f in fields(owner) if f.name == leaf).metadata["doc"]
        out.append(doc + "\n")
        for f in scalars:
            dotted = f"{name}.{f.name}"
            out.append(f"### `{dotted}`\n")
            out.append(f"{_summary(f)}. Environment: `{env_name(dotted)}`.\n")
            out.append(f.metadata["doc"] + "\n")
    return "\n".join(out)


def _lookup_class(dotted: str) -> type:
    cls: type = Config
    for part in filter(None, dotted.split(".")):
        cls = next(_ftype(f) for f in fields(cls) if f.name == part)
    return cls


def example_toml() -> str:
    """shoal.example.toml: every key at its default, with its documentation as comments."""
    head = ("# shoal configuration: every key at its default. Generated by\n"
            "# `shoal config show --defaults --comments`; the reference is docs/configuration.md.\n"
            "# Copy what you change into your own file and pass it with --config or SHOAL_CONFIG.\n\n")
    return head + to_toml(Config(), comments=True)


