"""A shard: the sessions of its connections, their subscriptions, the retained store.

The shard turns protocol events into effects and does no I/O of its own: it is
fed decoded packets by the worker (``handle``), told when a connection is lost
(``connection_lost``) and when time passes (``tick``); it answers by writing
packets through each link's sans-IO connection and by calling ``forward`` for
messages that other shards must see (a no-op on a one-shard broker).

Semantics follow MQTT 5.0 and 3.1.1; section numbers in comments point at the
normative statement a branch implements.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import base64
import os
import time
from collections.abc import Callable

from shards.config import MQTTConfig
from shards.host import Host, IndexKey, LocalHost
from shards.message import Message
from shards.protocol.errors import ProtocolError, Reason
from shards.protocol.connection import CLOSED, CONNECTING
from shards.protocol.packets import (
    AUTH, DISCONNECT, MQTT_5, MQTT_31, PINGREQ, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL,
    SUBSCRIBE, UNSUBSCRIBE, Auth, Connack, Connect, Disconnect, Packet, Pingresp, Prop, Properties,
    Puback, Pubcomp, Publish, Pubrec, Pubrel, SubOptions, Suback, Subscribe, Unsuback,
    Unsubscribe,
)
from shards.protocol.topics import parse_shared, validate_topic_filter, validate_topic_name
from shards.retain import RetainedStore
from shards.scram import METHOD as SCRAM_METHOD
from shards.scram import ScramError, ScramServer
from shards.security import PUBLISH as ACL_PUBLISH
from shards.security import SUBSCRIBE as ACL_SUBSCRIBE
from shards.security import AuthRequest, Principal, Security, peer_ip
from shards.session import Counters, Link, Session
from shards.store import Store
from shards.subs import Subscription, SubscriptionTrie
from shards.transfer import session_from_dict, session_to_dict

log = logging.getLogger("shoal.shard")

VERSION = "0.1.0"
_EXPIRE = 0
_WILL = 1


class Shard:
    def __init__(self, cfg: MQTTConfig, index: int = 0, now: float = 0.0,
                 host: Host | None = None, security: Security | None = None) -> None:
        self.cfg = cfg
        self.index = index
        self.host: Host = host if host is not None else LocalHost()
        # authentication, ACL, bans; the default one only applies mqtt.allow_anonymous
        self.security = security if security is not None else Security(
            allow_anonymous=cfg.allow_anonymous)
        self.store: Store | None = None  # set by the worker when persistence is on
        self.sessions: dict[str, Session] = {}
        self.trie = SubscriptionTrie()
        self.retained = RetainedStore(cfg.max_retained_messages)
        self.counters = Counters()
        self.started = now
        self.wall_started = time.time()
        self.connected = 0
        self.max_connected = 0
        self._timers: list[tuple[float, int, int, str]] = []
        self._seq = itertools.count()
        self._next_sys = now + cfg.sys_interval if cfg.sys_interval > 0 else None
        self._bytes = (0, 0)
        # message ids are unique host-wide: the shard index above 48 bits of counter
        self._msg_ids = itertools.count((index << 48) + 1)
        # how many local subscriptions contribute each host-wide index key
        self._keys: dict[IndexKey, int] = {}
        # sessions that moved to another shard, relayed until its index delta is in
        self._relays: dict[str, list[Subscription]] = {}
        # client ids with a CONNECT in progress here, and the hand-overs that wait for it
        self._connecting: dict[str, list[Callable[[float], None]]] = {}
        self._connecting_count: dict[str, int] = {}
        # the $SYS numbers: this shard's own, or host-wide ones the host supplies
        self.sys_stats: Callable[[float], dict[str, int | float | str]] | None = self.stats

    # -- dispatch -------------------------------------------------------------------

    def handle(self, link: Link, packet: Packet, now: float) -> None:
        """One decoded packet from ``link``. Raises ProtocolError for a violation."""
        ptype = packet.type
        if ptype == PUBLISH:
            self._publish(link, packet, now)  # type: ignore[arg-type]
        elif ptype == PUBACK or ptype == PUBCOMP:
            session = link.session
            if session is not None:
                session.acked(packet.packet_id, now)  # type: ignore[attr-defined]
        elif ptype == PUBREC:
            self._pubrec(link, packet, now)  # type: ignore[arg-type]
        elif ptype == PUBREL:
            self._pubrel(link, packet)  # type: ignore[arg-type]
        elif ptype == SUBSCRIBE:
            self._subscribe(link, packet, now)  # type: ignore[arg-type]
        elif ptype == UNSUBSCRIBE:
            self._unsubscribe(link, packet)  # type: ignore[arg-type]
        elif ptype == PINGREQ:
            link.conn.send(Pingresp())
            link.wake()
        elif ptype == DISCONNECT:
            if link.session is None:  # a client that gave up during enhanced authentication
                self.end_link(link, now)
                return
            self._disconnect(link, packet, now)  # type: ignore[arg-type]
        elif ptype == AUTH:
            self._auth(link, packet, now)  # type: ignore[arg-type]
        else:
            self.connect(link, packet, now)  # type: ignore[arg-type]

    # -- CONNECT ------------------------------------------------------------------------

    def connect(self, link: Link, p: Connect, now: float) -> None:
        conn = link.conn
        if p.username is None:  # mTLS: the verified certificate's name (worker's peer_username)
            p.username = link.peer_username
        # the listener it came in on may have its own authentication (see [listeners.*])
        listener: str | None = getattr(link, "listener", None)
        refusal = self._check_connect(p, listener)
        if refusal is not None:
            reason, why = refusal
            log.info("refused CONNECT from %s (%r): %s", link.peer, p.client_id, why)
            conn.refuse(reason, why)
            link.close()
            return
        client_id = p.client_id
        assigned = None
        if not client_id:
            client_id = assigned = self._assign_client_id()
        sec = self.security
        ip = peer_ip(link.peer)
        why = sec.banned_why(client_id, p.username, ip, now)
        if why is not None:
            log.info("refused CONNECT from %s (%r): %s", link.peer, client_id, why)
            conn.refuse(Reason.BANNED, why)
            link.close()
            return
        if Prop.AUTHENTICATION_METHOD in p.props:  # _check_connect let only SCRAM through
            self._scram_start(link, p, client_id, assigned, now)
            return
        principal = Principal(client_id, p.username, ip)

        def authenticated(reason: int | None, later: float) -> None:
            if conn.state != CONNECTING:
                return  # the client left (or timed out) while its credentials were checked
            if reason:
                log.info("refused CONNECT from %s (%r, user %r): %s", link.peer, client_id,
                         p.username, Reason(reason).name.lower().replace("_", " "))
                conn.refuse(reason, "not authorized" if reason == Reason.NOT_AUTHORIZED
                            else "bad user name or password" if reason == Reason.BAD_USER_NAME_OR_PASSWORD
                            else "")
                link.close()
                link.wake()
                return
            if request.acl_rows is not None:  # rules a backend returned (a JWT's acl claim)
                sec.set_rules(principal, request.acl_rows)
            sec.fetch_rules(principal, lambda t: self._authorized(link, p, client_id, assigned,
                                                                  principal, t), later)

        # the answer may come later (a hash on a thread, a remote backend): the
        # connection stays CONNECTING, and what the client sends meanwhile stays buffered
        request = AuthRequest(client_id, p.username, p.password, ip, listener)
        sec.authenticate(request, authenticated, now)

    # -- enhanced authentication (MQTT 5 AUTH, SCRAM-SHA-256) ------------------------------

    def _scram_start(self, link: Link, p: Connect, client_id: str, assigned: str | None,
                     now: float) -> None:
        """CONNECT carried the client-first message: answer AUTH 0x18 with server-first.
        The verifier comes from the built-in store in memory, so no thread is needed."""
        conn = link.conn
        server = ScramServer(base64.b64encode(os.urandom(18)).decode("ascii"))
        try:
            name = server.client_first(p.props.get(Prop.AUTHENTICATION_DATA, b""))
        except ScramError as err:
            self._refuse_auth(link, client_id, p.username, err)
            return
        # a user name in CONNECT must be the one proved (a certificate's name, which
        # connect() put there when CONNECT had none, does not count)
        if p.username is not None and p.username != name and p.username != link.peer_username:
            self._refuse_auth(link, client_id, p.username, "SCRAM user differs from user name")
            return
        p.username = name  # who the client proves to be, for bans, ACLs and logs
        why = self.security.banned_why(client_id, name, peer_ip(link.peer), now)
        if why is not None:
            log.info("refused CONNECT from %s (%r): %s", link.peer, client_id, why)
            conn.refuse(Reason.BANNED, why)
            link.close()
            return
        conn.auth = _Scram(server, p, client_id, assigned)
        conn.challenge(server.server_first(self.security.scram_verifier(name)))
        link.wake()

    def _auth(self, link: Link, packet: Auth, now: float) -> None:
        conn = link.conn
        exchange = conn.auth
        if link.session is not None:
            self._reauth(link, packet, now)
            return
        if not isinstance(exchange, _Scram) or exchange.final is not None:
            # [MQTT-4.12.0-1]: no AUTH unless the CONNECT named a method
            raise ProtocolError(Reason.PROTOCOL_ERROR, "AUTH without an authentication method")
        p = exchange.connect
        assert p is not None
        try:
            exchange.final = exchange.server.client_final(
                packet.props.get(Prop.AUTHENTICATION_DATA, b""))
        except ScramError as err:
            self._refuse_auth(link, exchange.client_id, p.username, err)
            return
        principal = Principal(exchange.client_id, p.username, peer_ip(link.peer))
        self.security.fetch_rules(principal, lambda t: self._authorized(
            link, p, exchange.client_id, exchange.assigned, principal, t), now)

    def _reauth(self, link: Link, packet: Auth, now: float) -> None:
        """Re-authentication after CONNACK [MQTT-4.12.1]: AUTH 0x19 with a new client-first,
        our AUTH 0x18, the client's AUTH 0x18, then AUTH 0x00 with server-final. Packets keep
        flowing meanwhile. The user must stay the same (the session's ACL identity is fixed
        at CONNECT); a failure closes the connection with DISCONNECT 0x87."""
        conn = link.conn
        session = link.session
        assert session is not None
        method = conn.auth_method
        if method is None:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "AUTH without an authentication method")
        if packet.props.get(Prop.AUTHENTICATION_METHOD) != method:  # [MQTT-4.12.1-1]
            raise ProtocolError(Reason.PROTOCOL_ERROR, "AUTH with another authentication method")
        data = packet.props.get(Prop.AUTHENTICATION_DATA, b"")
        exchange = conn.auth
        code = packet.reason_code
        username = session.principal.username if session.principal is not None else None
        if code == Reason.RE_AUTHENTICATE:
            if isinstance(exchange, _Scram) and exchange.final is None:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "re-authentication already under way")
            server = ScramServer(base64.b64encode(os.urandom(18)).decode("ascii"))
            try:
                name = server.client_first(data)
                if name != username:
                    raise ScramError("re-authentication as another user")
            except ScramError as err:
                self._reauth_failed(link, err, now)
                return
            conn.auth = _Scram(server, None, session.client_id, None)
            conn.send(Auth(Reason.CONTINUE_AUTHENTICATION, {
                Prop.AUTHENTICATION_METHOD: method,
                Prop.AUTHENTICATION_DATA: server.server_first(self.security.scram_verifier(name))}))
            link.wake()
        elif code == Reason.CONTINUE_AUTHENTICATION:
            if not isinstance(exchange, _Scram) or exchange.final is not None:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "AUTH 0x18 without an exchange")
            try:
                exchange.final = exchange.server.client_final(data)
            except ScramError as err:
                self._reauth_failed(link, err, now)
                return
            conn.send(Auth(Reason.SUCCESS, {Prop.AUTHENTICATION_METHOD: method,
                                            Prop.AUTHENTICATION_DATA: exchange.final}))
            link.wake()
        else:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "a client AUTH must be 0x18 or 0x19")

    def _reauth_failed(self, link: Link, why: object, now: float) -> None:
        log.info("re-authentication of %s (%r) failed: %s", link.peer, link.conn.client_id, why)
        link.conn.disconnect(Reason.NOT_AUTHORIZED,
                             {Prop.REASON_STRING: "re-authentication failed"}
                             if link.conn.problem_info else None)
        link.wake()
        self.end_link(link, now)

    def _refuse_auth(self, link: Link, client_id: str, username: str | None,
                     why: object) -> None:
        log.info("refused CONNECT from %s (%r, user %r): SCRAM-SHA-256: %s", link.peer,
                 client_id, username, why)
        # the client is not told which step failed (a user that does not exist looks the
        # same as a wrong password)
        link.conn.refuse(Reason.BAD_USER_NAME_OR_PASSWORD, "authentication failed")
        link.close()
        link.wake()

    def _authorized(self, link: Link, p: Connect, client_id: str, assigned: str | None,
                    principal: Principal, now: float) -> None:
        if link.conn.state != CONNECTING:
            return  # the client left while its ACL rows were fetched: nothing claimed yet
        self._claim(link, p, client_id, assigned, principal, now)

    def _claim(self, link: Link, p: Connect, client_id: str, assigned: str | None,
               principal: Principal, now: float) -> None:
        cfg = self.cfg
        v5 = p.protocol_level == MQTT_5
        keepalive = p.keepalive
        if cfg.server_keep_alive:
            keepalive = cfg.server_keep_alive
        elif keepalive > cfg.max_keepalive:
            keepalive = cfg.max_keepalive
        if v5:
            expiry = min(p.props.get(Prop.SESSION_EXPIRY_INTERVAL, 0), cfg.max_session_expiry_interval)
        else:
            expiry = 0 if p.clean_start else cfg.max_session_expiry_interval

        def claimed(remote: dict[str, object] | None, later: float) -> None:
            self._connected(link, p, client_id, assigned, principal, keepalive, expiry, remote,
                            later)

        # another shard may hold the session: the host gets it back first
        self._connecting_count[client_id] = self._connecting_count.get(client_id, 0) + 1
        self._connecting.setdefault(client_id, [])
        self.host.claim(client_id, p.clean_start, claimed, now)

    def _connected(self, link: Link, p: Connect, client_id: str, assigned: str | None,
                   principal: Principal, keepalive: int, expiry: int,
                   remote: dict[str, object] | None, now: float) -> None:
        cfg = self.cfg
        conn = link.conn
        v5 = p.protocol_level == MQTT_5
        if remote is not None:
            # CONNACK waits until the index knows the moved subscriptions are here
            def adopted(later: float) -> None:
                self.host.adopted(client_id)
                self._connected(link, p, client_id, assigned, principal, keepalive, expiry, None,
                                later)

            self._install(remote, now, adopted)
            return
        if conn.state != CONNECTING:
            # the client left while the id was being claimed: keep any session we got
            if client_id not in self.sessions:
                self.host.released(client_id)
            else:
                session = self.sessions[client_id]
                if session.link is None and session.expires_at is None:
                    session.expires_at = now + session.expiry_interval
                    self._schedule(session.expires_at, _EXPIRE, client_id)
            self._connect_done(client_id, now)
            return
        session = self.sessions.get(client_id)
        if session is not None and session.link is not None:
            self._take_over(session, now)
            session = self.sessions.get(client_id)  # gone if it had no expiry
        if session is not None and p.clean_start:
            self._end_session(session, now, release=False)
            session = None
        session_present = session is not None
        if session is None:
            session = Session(client_id, cfg, self.counters, now)
            self.sessions[client_id] = session
        else:
            # a new connection to the session before the will delay ran out [MQTT-3.1.3-9]
            session.will_at = None
            session.expires_at = None
        session.version = p.protocol_level
        session.principal = principal
        session.will = p.will
        session.expiry_interval = expiry
        self._set_journal(session)
        client_receive_max = p.props.get(Prop.RECEIVE_MAXIMUM, 65535) if v5 else 65535
        session.send_quota = min(client_receive_max, cfg.max_inflight)
        session.link = link
        link.session = session

        props: Properties = {}
        if v5:
            props = self._connack_props(p, expiry, keepalive, assigned, client_id)
            exchange = conn.auth
            if exchange is not None:  # the server-final message proves us to the client
                props[Prop.AUTHENTICATION_METHOD] = conn.auth_method
                props[Prop.AUTHENTICATION_DATA] = exchange.final
                exchange.connect = None  # the CONNECT (and its will) is not kept past here
        conn.accept(Connack(session_present, Reason.SUCCESS, props), keepalive)
        self.connected += 1
        self.max_connected = max(self.max_connected, self.connected)
        if session_present:
            session.resume(now)
        link.wake()
        self._connect_done(client_id, now)
        link.resume(now)

    def _connect_done(self, client_id: str, now: float) -> None:
        n = self._connecting_count.get(client_id, 0) - 1
        if n > 0:
            self._connecting_count[client_id] = n
            return
        self._connecting_count.pop(client_id, None)
        self.host.claim_done(client_id)
        for handover in self._connecting.pop(client_id, ()):
            handover(now)

    def _check_connect(self, p: Connect, listener: str | None = None) -> tuple[int, str] | None:
        cfg = self.cfg
        v5 = p.protocol_level == MQTT_5
        cid = p.client_id
        if not cid:
            if p.protocol_level == MQTT_31:
                return Reason.CLIENT_IDENTIFIER_NOT_VALID, "MQTT 3.1 requires a client identifier"
            if not p.clean_start and not v5:
                # [MQTT-3.1.3-8]
                return Reason.CLIENT_IDENTIFIER_NOT_VALID, "empty client id needs clean session"
            if not cfg.allow_zero_length_clientid:
                return Reason.CLIENT_IDENTIFIER_NOT_VALID, "empty client identifiers are not allowed"
        elif len(cid) > cfg.max_client_id_length:
            return Reason.CLIENT_IDENTIFIER_NOT_VALID, "client identifier too long"
        method = p.props.get(Prop.AUTHENTICATION_METHOD)
        if method is not None and (method != SCRAM_METHOD
                                   or not self.security.scram_offered(listener)):
            return Reason.BAD_AUTHENTICATION_METHOD, f"authentication method {method!r} is not offered"
        will = p.will
        if will is not None:
            try:
                validate_topic_name(will.topic, cfg.max_topic_levels)
            except ProtocolError as err:
                return Reason.TOPIC_NAME_INVALID, err.message
            if will.topic.startswith("$SYS"):
                return Reason.NOT_AUTHORIZED, "clients may not publish to $SYS"
            if will.qos > cfg.maximum_qos:
                return Reason.QOS_NOT_SUPPORTED, f"will QoS above {cfg.maximum_qos}"
            if will.retain and not cfg.retain_available:
                return Reason.RETAIN_NOT_SUPPORTED, "retained messages are not available"
            if will.props.get(Prop.PAYLOAD_FORMAT_INDICATOR) == 1 and not _is_utf8(will.payload):
                return Reason.PAYLOAD_FORMAT_INVALID, "will payload is not UTF-8"
        return None

    def _connack_props(self, p: Connect, expiry: int, keepalive: int, assigned: str | None,
                       client_id: str) -> Properties:
        cfg = self.cfg
        props: Properties = {
            Prop.RECEIVE_MAXIMUM: cfg.receive_maximum,
            Prop.MAXIMUM_PACKET_SIZE: cfg.max_packet_size,
            Prop.TOPIC_ALIAS_MAXIMUM: cfg.topic_alias_maximum,
            Prop.RETAIN_AVAILABLE: int(cfg.retain_available),
            Prop.WILDCARD_SUBSCRIPTION_AVAILABLE: int(cfg.wildcard_subscription_available),
            Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE: int(cfg.subscription_identifier_available),
            Prop.SHARED_SUBSCRIPTION_AVAILABLE: int(cfg.shared_subscription_available),
        }
        if cfg.maximum_qos < 2:
            props[Prop.MAXIMUM_QOS] = cfg.maximum_qos
        if expiry != p.props.get(Prop.SESSION_EXPIRY_INTERVAL, 0):
            props[Prop.SESSION_EXPIRY_INTERVAL] = expiry  # [MQTT-3.2.2-9]
        if keepalive != p.keepalive:
            props[Prop.SERVER_KEEP_ALIVE] = keepalive  # [MQTT-3.2.2-21]
        if assigned is not None:
            props[Prop.ASSIGNED_CLIENT_IDENTIFIER] = assigned
        if p.props.get(Prop.REQUEST_RESPONSE_INFORMATION) == 1:
            props[Prop.RESPONSE_INFORMATION] = f"shoal/response/{client_id}"
        return props

    def _assign_client_id(self) -> str:
        while True:
            cid = f"shoal-{self.index}-{os.urandom(8).hex()}"
            if cid not in self.sessions:
                return cid

    def _take_over(self, session: Session, now: float) -> None:
        """A new connection claims a connected session: the old one is told and closed."""
        old = session.link
        assert old is not None
        log.info("session %r taken over (was %s)", session.client_id, old.peer)
        old.conn.disconnect(Reason.SESSION_TAKEN_OVER)
        self.end_link(old, now)

    # -- connection loss, will, session expiry ----------------------------------------------

    def end_link(self, link: Link, now: float) -> None:
        """The broker closes ``link``: its session lets go of it now, not when the transport
        reports the close, so nothing routed meanwhile is written to a dead connection."""
        link.close()
        self.connection_lost(link, now)

    def connection_lost(self, link: Link, now: float) -> None:
        session = link.session
        if session is None or session.link is not link:
            return
        self._detach(session, link, now)

    def _detach(self, session: Session, link: Link, now: float) -> None:
        session.link = None
        link.session = None
        self.connected -= 1
        if self.security.flapping is not None and not self.host.disconnected(session.client_id, now):
            self.security.disconnected(session.client_id, now)
        if link.disconnected_cleanly:
            session.will = None
        if session.expiry_interval == 0:
            self._end_session(session, now)
            return
        session.expires_at = now + session.expiry_interval
        self._schedule(session.expires_at, _EXPIRE, session.client_id)
        self._changed(session)
        will = session.will
        if will is not None:
            delay = will.props.get(Prop.WILL_DELAY_INTERVAL, 0)
            if delay <= 0:
                self._publish_will(session, now)
            else:
                # the will goes at the delay or at session end, whichever is first [MQTT-3.1.3-9]
                session.will_at = now + min(delay, session.expiry_interval)
                self._schedule(session.will_at, _WILL, session.client_id)

    def _end_session(self, session: Session, now: float, release: bool = True) -> None:
        if session.will is not None and session.link is None:
            self._publish_will(session, now)
        self._drop_subscriptions(session)
        session.reset_for_clean_start()
        if session.journal is not None:
            session.journal.session_gone(session.client_id)
            session.journal = None
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            # a CONNECT in progress here has claimed the id anew: releasing it now would
            # erase the new connection's ownership from the host-wide registry
            if release and session.client_id not in self._connecting:
                self.host.released(session.client_id)

    def _set_journal(self, session: Session) -> None:
        """Sessions that outlive their connection are kept in the store; others not."""
        store = self.store
        if store is None:
            return
        if session.expiry_interval > 0:
            if session.journal is None:
                session.journal = store
                session.persist_all()
            else:
                store.session_changed(session)
        elif session.journal is not None:
            session.journal = None
            store.session_gone(session.client_id)

    def _changed(self, session: Session) -> None:
        if session.journal is not None:
            session.journal.session_changed(session)

    def restore(self, now: float) -> None:
        """Load what the store kept: persistent sessions (offline) and retained messages."""
        store = self.store
        if store is None:
            return
        for msg in store.load_retained(now):
            if not msg.expired(now):
                self.retained.set(msg)
        for session, subs in store.load_sessions(self.cfg, self.counters, now):
            session.journal = store
            self.sessions[session.client_id] = session
            for sub in subs:
                self.trie.add(sub)
                self._ref(sub)
            assert session.expires_at is not None
            self._schedule(session.expires_at, _EXPIRE, session.client_id)
        if self.sessions:
            log.info("restored %d sessions and %d retained messages", len(self.sessions),
                     len(self.retained))

    def _drop_subscriptions(self, session: Session) -> None:
        gone: list[IndexKey] = []
        for sub in session.subscriptions.values():
            self.trie.remove(session.client_id, sub.filter, sub.group)
            gone.extend(self._unref(sub))
        session.subscriptions.clear()
        if gone:
            self.host.unsubscribed(gone)

    # -- host-wide index keys ---------------------------------------------------------

    def _ref(self, sub: Subscription) -> list[IndexKey]:
        """Count ``sub`` in; the keys that are new to this shard."""
        new = []
        keys = self._keys
        for key in ((sub.filter, None), (sub.filter, sub.group)) if sub.group else ((sub.filter, None),):
            n = keys.get(key, 0)
            keys[key] = n + 1
            if n == 0:
                new.append(key)
        return new

    def _unref(self, sub: Subscription) -> list[IndexKey]:
        gone = []
        keys = self._keys
        for key in ((sub.filter, None), (sub.filter, sub.group)) if sub.group else ((sub.filter, None),):
            n = keys.get(key, 0) - 1
            if n <= 0:
                keys.pop(key, None)
                gone.append(key)
            else:
                keys[key] = n
        return gone

    def index_keys(self) -> list[IndexKey]:
        """Every key this shard contributes (to resynchronise a restarted router)."""
        return list(self._keys)

    # -- sessions moving between shards --------------------------------------------------

    def give_up(self, client_id: str, to_shard: int, clean_start: bool, now: float,
                reply: Callable[[dict[str, object] | None], None], after_connect: bool) -> None:
        """Another shard claimed ``client_id``: close our connection and hand over the session.

        ``after_connect``: our own CONNECT for the id was claimed before theirs (the
        host knows the router's order), so the hand-over waits until it is answered:
        answering now would let it finish with a fresh session beside the one we ship.
        """
        waiting = self._connecting.get(client_id) if after_connect else None
        if waiting is not None:
            waiting.append(lambda later: reply(self._give_up(client_id, to_shard, clean_start, later)))
        else:
            reply(self._give_up(client_id, to_shard, clean_start, now))

    def _give_up(self, client_id: str, to_shard: int, clean_start: bool,
                 now: float) -> dict[str, object] | None:
        """Its subscriptions stay in our trie, relaying to ``to_shard``, until
        :meth:`drop_relay` (the new shard's index delta is in by then), so no
        message published in between is lost."""
        session = self.sessions.get(client_id)
        if session is None:
            return None
        if session.link is not None:
            self._take_over(session, now)
            session = self.sessions.get(client_id)
            if session is None:
                return None
        if clean_start:
            self._end_session(session, now, release=False)
            return None
        state = session_to_dict(session)
        if session.journal is not None:
            session.journal.session_gone(client_id)  # the new owner stores it now
            session.journal = None
        relay = RelayTarget(self.host, to_shard, client_id)
        for sub in session.subscriptions.values():
            sub.session = relay  # type: ignore[assignment]
        self._relays[client_id] = list(session.subscriptions.values())
        self.trie.touch()
        del self.sessions[client_id]
        session.subscriptions = {}
        return state

    def disown(self, client_id: str, now: float) -> None:
        """A restored session that another shard has taken up since: a stale copy."""
        session = self.sessions.get(client_id)
        if session is not None and session.link is None:
            log.info("dropping stale session %r: it lives on another shard now", client_id)
            session.will = None
            self._end_session(session, now, release=False)

    def drop_relay(self, client_id: str) -> None:
        subs = self._relays.pop(client_id, None)
        if not subs:
            return
        gone: list[IndexKey] = []
        for sub in subs:
            self.trie.remove(client_id, sub.filter, sub.group)
            gone.extend(self._unref(sub))
        if gone:
            self.host.unsubscribed(gone)

    def _install(self, state: dict[str, object], now: float, then: Callable[[float], None]) -> None:
        """A session given up by another shard becomes ours (offline until its link attaches)."""
        session, subs = session_from_dict(state, self.cfg, self.counters, now)
        old = self.sessions.get(session.client_id)
        if old is not None:
            self._end_session(old, now, release=False)
        self.sessions[session.client_id] = session
        self._set_journal(session)
        session.dedupe = set()  # relayed copies may repeat direct ones until the relay ends
        new: list[IndexKey] = []
        for sub in subs:
            self.trie.add(sub)
            new.extend(self._ref(sub))
        if new:
            self.host.subscribed(new, then, now)
        else:
            then(now)

    def relayed(self, client_id: str, msg: Message, qos: int, retain: bool, sub_ids: tuple[int, ...],
                now: float) -> None:
        session = self.sessions.get(client_id)
        if session is not None:
            session.deliver(msg, qos, retain, sub_ids, now)

    def relay_ended(self, client_id: str) -> None:
        session = self.sessions.get(client_id)
        if session is not None:
            session.dedupe = None

    def received(self, msg: Message, deliver: bool, now: float) -> None:
        """A message forwarded by another shard."""
        if msg.retain:
            self.retained.set(msg)
        if deliver:
            self.deliver_local(msg, now)

    def _publish_will(self, session: Session, now: float) -> None:
        will = session.will
        session.will = None
        session.will_at = None
        if will is None:
            return
        sec = self.security
        if sec.authorizing:
            who = session.principal or Principal(session.client_id, None, None)
            if not sec.allowed(who, ACL_PUBLISH, will.topic):
                sec.publish_denied += 1
                self.counters.dropped += 1
                log.debug("will of %r to %r denied by the ACL", session.client_id, will.topic)
                return
        props = {k: v for k, v in will.props.items() if k != Prop.WILL_DELAY_INTERVAL}
        msg = Message.from_publish(will.topic, will.payload, will.qos, will.retain, props,
                                   session.client_id, now, next(self._msg_ids))
        self.route(msg, now)

    def _schedule(self, when: float, kind: int, client_id: str) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), kind, client_id))

    # -- PUBLISH ------------------------------------------------------------------------

    def _publish(self, link: Link, p: Publish, now: float) -> None:
        cfg = self.cfg
        session = link.session
        assert session is not None
        qos = p.qos
        if qos > cfg.maximum_qos:
            raise ProtocolError(Reason.QOS_NOT_SUPPORTED, f"QoS {qos} above the maximum {cfg.maximum_qos}")
        if p.retain and not cfg.retain_available:
            raise ProtocolError(Reason.RETAIN_NOT_SUPPORTED, "retained messages are not available")
        topic = p.topic
        if cfg.max_topic_levels and topic.count("/") >= cfg.max_topic_levels:
            raise ProtocolError(Reason.TOPIC_NAME_INVALID, f"more than {cfg.max_topic_levels} topic levels")
        self.counters.received += 1
        self.counters.publish_received += 1
        props = p.props
        v5 = session.version == MQTT_5
        if props and props.get(Prop.PAYLOAD_FORMAT_INDICATOR) == 1 and not _is_utf8(p.payload):
            # [MQTT-3.3.2-4] permits PUBACK/PUBREC with 0x99 or DISCONNECT 0x99
            if qos == 0 or not v5:
                raise ProtocolError(Reason.PAYLOAD_FORMAT_INVALID, "payload is not UTF-8")
            self._ack(link, p, Reason.PAYLOAD_FORMAT_INVALID, "payload is not valid UTF-8")
            return
        if topic[:4] == "$SYS":
            # $SYS belongs to the broker; the publish is acknowledged and dropped
            self.counters.dropped += 1
            self._ack(link, p, Reason.NOT_AUTHORIZED if v5 else Reason.SUCCESS,
                      "clients may not publish to $SYS")
            return
        if qos == 2:
            inbound = session.inbound_qos2
            if p.packet_id in inbound:
                # a re-sent QoS 2 PUBLISH we already routed: acknowledge again only [MQTT-4.3.3-9]
                link.conn.send_ack(Pubrec(p.packet_id))
                link.wake()
                return
        sec = self.security
        if sec.authorizing and not sec.allowed(session.principal, ACL_PUBLISH, topic):  # type: ignore[arg-type]
            self._publish_denied(link, session, p, v5)
            return
        if qos == 2:
            session.hold_qos2(p.packet_id)
            self._changed(session)
        if props:
            msg = Message.from_publish(topic, p.payload, qos, p.retain, props, session.client_id,
                                       now, next(self._msg_ids), p.wire)
        else:  # the common case, without from_publish's property handling
            msg = Message(topic, p.payload, qos, p.retain, None, None, session.client_id, now,
                          next(self._msg_ids))
        reached = self.route(msg, now)
        if qos:
            reason = Reason.SUCCESS if reached or not v5 else Reason.NO_MATCHING_SUBSCRIBERS
            conn = link.conn
            awaiting = self.host.awaiting(msg.id)
            if qos == 1 and not reason and not awaiting:
                conn.send_puback(p.packet_id)
                link.wake()
                return
            ack = Puback(p.packet_id, reason) if qos == 1 else Pubrec(p.packet_id, reason)
            if not awaiting:
                conn.send_ack(ack)
                link.wake()
                return
            cell = conn.reserve_ack()

            def durable(later: float) -> None:
                conn.release_ack(cell, ack)
                link.wake()

            # the ack promises the message is kept: wait for the shards it went to
            self.host.when_durable(msg.id, durable, now)

    def _publish_denied(self, link: Link, session: Session, p: Publish, v5: bool) -> None:
        sec = self.security
        sec.publish_denied += 1
        self.counters.dropped += 1
        log.debug("PUBLISH from %r to %r denied by the ACL", session.client_id, p.topic)
        if sec.cfg.acl_deny_action == "disconnect":
            raise ProtocolError(Reason.NOT_AUTHORIZED, f"not authorized to publish to {p.topic!r}")
        if v5:
            # QoS 0: nothing to say; QoS 1/2: the negative ack ends the flow [MQTT-4.3.3-4]
            self._ack(link, p, Reason.NOT_AUTHORIZED, "not authorized")
            return
        # MQTT 3.1.1 has no negative acknowledgement: a refused PUBACK/PUBREC cannot be
        # said, and withholding it would make the client resend forever. As EMQX does by
        # default, the message is acknowledged and dropped; QoS 2 completes its exchange.
        if p.qos == 2:
            session.hold_qos2(p.packet_id)
            self._changed(session)
        self._ack(link, p, Reason.SUCCESS)

    def _ack(self, link: Link, p: Publish, reason: int, why: str = "") -> None:
        # the connection strips the reason string if the client asked for no problem info
        props = {Prop.REASON_STRING: why} if why and reason >= 0x80 else None
        if p.qos == 1:
            link.conn.send_ack(Puback(p.packet_id, reason, props))
        elif p.qos == 2:
            link.conn.send_ack(Pubrec(p.packet_id, reason, props))
        link.wake()

    def route(self, msg: Message, now: float) -> int:
        """Store if retained, deliver to this shard's subscribers, forward to others.

        Returns the number of sessions (and other shards) that got the message.
        """
        if msg.retain:
            self.retained.set(msg)
            if self.store is not None and msg.topic[:1] != "$":
                self.store.retained_set(msg)
        reached = self.deliver_local(msg, now)
        return reached + self.host.forward(msg)

    def deliver_local(self, msg: Message, now: float) -> int:
        targets, groups = self.trie.match(msg.topic)
        if len(targets) + len(groups) > 1 and msg.encoded is None:
            msg.encoded = {}  # a fan-out: encode once per (version, qos, retain)
        origin = msg.origin
        qos = msg.qos
        retain = msg.retain
        reached = 0
        for target in targets:
            if target.session.client_id == origin:
                target = target.for_self  # type: ignore[assignment]
                if target is None:
                    continue  # no-local [MQTT-3.8.3-3]
            q = qos if qos < target.qos else target.qos
            # retain flag on forwarded messages only with retain-as-published [MQTT-3.3.1-12/13]
            target.session.deliver(msg, q, retain and target.rap, target.sub_ids, now)
            reached += 1
        if groups:
            strategy = self.cfg.shared_subscription_strategy
            serves = self.host.serves_group
            for group in groups:
                if not serves(group.name, group.filter, msg):
                    continue  # another shard's member gets this one
                member = group.pick(strategy)
                if member is None:
                    continue
                q = qos if qos < member.opts.qos else member.opts.qos
                ids = (member.sub_id,) if member.sub_id else ()
                member.session.deliver(msg, q, retain and member.opts.retain_as_published, ids, now)
                reached += 1
        return reached

    def _pubrec(self, link: Link, p: Pubrec, now: float) -> None:
        session = link.session
        assert session is not None
        if p.reason_code >= 0x80:
            session.acked(p.packet_id, now)  # the receiver refused it: the flow ends [MQTT-4.3.3-4]
            return
        if session.received(p.packet_id):
            link.conn.send(Pubrel(p.packet_id))
        else:
            link.conn.send(Pubrel(p.packet_id, Reason.PACKET_IDENTIFIER_NOT_FOUND))
        link.wake()

    def _pubrel(self, link: Link, p: Pubrel) -> None:
        session = link.session
        assert session is not None
        if p.packet_id in session.inbound_qos2:
            session.inbound_qos2.discard(p.packet_id)
            self._changed(session)
            link.conn.send(Pubcomp(p.packet_id))
        else:
            link.conn.send(Pubcomp(p.packet_id, Reason.PACKET_IDENTIFIER_NOT_FOUND))
        link.wake()

    # -- SUBSCRIBE / UNSUBSCRIBE --------------------------------------------------------

    def _subscribe(self, link: Link, p: Subscribe, now: float) -> None:
        cfg = self.cfg
        session = link.session
        assert session is not None
        sub_id = p.props.get(Prop.SUBSCRIPTION_IDENTIFIER) if p.props else None
        if sub_id is not None and not cfg.subscription_identifier_available:
            raise ProtocolError(Reason.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                                "subscription identifiers are not available")
        codes: list[int] = []
        retained: list[Subscription] = []
        problems: list[str] = []
        new_keys: list[IndexKey] = []
        for filt, opts in p.topics:
            code, sub, new = self._subscribe_one(session, filt, opts, sub_id, new_keys)
            codes.append(code)
            if code >= 0x80:
                problems.append(f"{filt!r}: {Reason(code).name.lower().replace('_', ' ')}")
            if sub is not None and sub.group is None:
                rh = opts.retain_handling
                if rh == 0 or (rh == 1 and new):
                    retained.append(sub)
        props = {Prop.REASON_STRING: "; ".join(problems)} if problems and session.version == MQTT_5 else None
        suback = Suback(p.packet_id, codes, props)
        # the SUBACK goes where the SUBSCRIBE came from (a QUIC data stream), even when the
        # host-wide index makes it wait
        here = link.conn.here()

        def applied(later: float) -> None:
            if session.link is not link:
                return  # the connection went away while the index was updated
            link.conn.send_on(here, suback)
            # retained messages follow the SUBACK, with the retain flag set [MQTT-3.3.1-9]
            for sub in retained:
                ids = (sub.sub_id,) if sub.sub_id else ()
                for msg in self.retained.match(sub.filter, later):
                    q = msg.qos if msg.qos < sub.opts.qos else sub.opts.qos
                    session.deliver(msg, q, True, ids, later)
            link.wake()

        if new_keys:
            # the SUBACK waits for the host-wide index: after it, every publish finds us
            self.host.subscribed(new_keys, applied, now)
        else:
            applied(now)

    def _subscribe_one(self, session: Session, filt: str, opts: SubOptions, sub_id: int | None,
                       new_keys: list[IndexKey]) -> tuple[int, Subscription | None, bool]:
        cfg = self.cfg
        try:
            group, real = parse_shared(filt)
            validate_topic_filter(real, cfg.max_topic_levels)
        except ProtocolError:
            return Reason.TOPIC_FILTER_INVALID, None, False
        if group is not None:
            if not cfg.shared_subscription_available:
                return Reason.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED, None, False
            if opts.no_local:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "no-local on a shared subscription")
        if not cfg.wildcard_subscription_available and ("+" in real or "#" in real):
            return Reason.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED, None, False
        sec = self.security
        if sec.authorizing and not sec.allowed(session.principal, ACL_SUBSCRIBE, real):  # type: ignore[arg-type]
            # 0x87 in SUBACK; MQTT 3.1.1 encodes it as 0x80 Failure
            sec.subscribe_denied += 1
            log.debug("SUBSCRIBE of %r to %r denied by the ACL", session.client_id, filt)
            return Reason.NOT_AUTHORIZED, None, False
        existing = session.subscriptions.get(filt)
        if (existing is None and cfg.max_subscriptions_per_client
                and len(session.subscriptions) >= cfg.max_subscriptions_per_client):
            return Reason.QUOTA_EXCEEDED, None, False
        qos = min(opts.qos, cfg.maximum_qos)
        granted = SubOptions(qos, opts.no_local, opts.retain_as_published, opts.retain_handling)
        sub = Subscription(session, real, granted, sub_id, group)
        self.trie.add(sub)
        session.subscriptions[filt] = sub
        if existing is None:
            new_keys.extend(self._ref(sub))
        self._changed(session)
        return qos, sub, existing is None

    def _unsubscribe(self, link: Link, p: Unsubscribe) -> None:
        session = link.session
        assert session is not None
        codes = []
        gone: list[IndexKey] = []
        for filt in p.topics:
            sub = session.subscriptions.pop(filt, None)
            if sub is None:
                codes.append(Reason.NO_SUBSCRIPTION_EXISTED)
            else:
                self.trie.remove(session.client_id, sub.filter, sub.group)
                gone.extend(self._unref(sub))
                codes.append(Reason.SUCCESS)
        if gone:
            self.host.unsubscribed(gone)
        self._changed(session)
        link.conn.send(Unsuback(p.packet_id, codes))
        link.wake()

    # -- DISCONNECT ---------------------------------------------------------------------

    def _disconnect(self, link: Link, p: Disconnect, now: float) -> None:
        session = link.session
        assert session is not None
        expiry = p.props.get(Prop.SESSION_EXPIRY_INTERVAL) if p.props else None
        if expiry is not None:
            if session.expiry_interval == 0 and expiry > 0:
                raise ProtocolError(Reason.PROTOCOL_ERROR,
                                    "session expiry cannot be set after connecting with 0")  # [MQTT-3.14.2-2]
            session.expiry_interval = min(expiry, self.cfg.max_session_expiry_interval)
            self._set_journal(session)
        link.disconnected_cleanly = p.reason_code != Reason.DISCONNECT_WITH_WILL
        # no reply on the wire: after its DISCONNECT the client sends and expects nothing
        # more [MQTT-3.14.4-1], and Mosquitto answers nothing either
        link.conn.state = CLOSED
        self.end_link(link, now)

    # -- time ---------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Fire due wills and session expiries; publish $SYS when due."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, kind, client_id = heapq.heappop(timers)
            session = self.sessions.get(client_id)
            if session is None or session.link is not None:
                continue
            if kind == _WILL and session.will_at == when:
                self._publish_will(session, now)
            elif kind == _EXPIRE and session.expires_at == when:
                log.debug("session %r expired", client_id)
                self._end_session(session, now)
        if self._next_sys is not None and now >= self._next_sys:
            self._next_sys = now + self.cfg.sys_interval
            self.retained.expire(now)
            if self.sys_stats is not None:
                self.publish_sys(now)

    def note_bytes(self, received: int, sent: int) -> None:
        self._bytes = (received, sent)

    def stats(self, now: float) -> dict[str, int | float | str]:
        c = self.counters
        return {
            "version": f"shoal {VERSION}",
            "uptime": int(now - self.started),
            "clients/connected": self.connected,
            "clients/disconnected": len(self.sessions) - self.connected,
            "clients/total": len(self.sessions),
            "clients/maximum": self.max_connected,
            "messages/received": c.received,
            "messages/sent": c.publish_sent,
            "messages/dropped": c.dropped,
            "messages/expired": c.expired,
            "connections/refused": c.connections_refused,
            "clients/throttled": c.clients_throttled,
            "publish/messages/received": c.publish_received,
            "publish/messages/sent": c.publish_sent,
            "subscriptions/count": self.trie.count,
            "retained messages/count": len(self.retained),
            "load/bytes/received": self._bytes[0],
            "load/bytes/sent": self._bytes[1],
        }

    def publish_sys(self, now: float) -> None:
        assert self.sys_stats is not None
        for key, value in self.sys_stats(now).items():
            msg = Message(f"$SYS/broker/{key}", str(value).encode(), 0, True, None, None, "", now,
                          next(self._msg_ids))
            self.route(msg, now)


class RelayTarget:
    """Stands in for a session that moved to another shard, while its relay lasts."""

    __slots__ = ("host", "shard", "client_id")
    online = True

    def __init__(self, host: Host, shard: int, client_id: str) -> None:
        self.host = host
        self.shard = shard
        self.client_id = client_id

    def deliver(self, msg: Message, qos: int, retain: bool, sub_ids: tuple[int, ...], now: float) -> None:
        self.host.relay(self.shard, self.client_id, msg, qos, retain, sub_ids)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Scram:
    """One connection's SCRAM exchange: between its CONNECT and its CONNACK, or a
    re-authentication after it (``connect`` is None)."""

    __slots__ = ("server", "connect", "client_id", "assigned", "final")

    def __init__(self, server: ScramServer, connect: Connect | None, client_id: str,
                 assigned: str | None) -> None:
        self.server = server
        self.connect = connect
        self.client_id = client_id
        self.assigned = assigned
        self.final: bytes | None = None  # the server-final message, once the proof checked
