"""Authorization rules in the spirit of EMQX's acl.conf, compiled once, first match wins.

One rule a line; a line whose first non-blank character is ``#`` is a comment (a
``#`` later in a line is the topic wildcard); fields are split like a shell does,
so a topic with spaces can be quoted::

    # verdict  who                      action      topics...
    allow      user:dashboard           subscribe   $SYS/#
    allow      all                      all         devices/%c/#
    allow      user:admin,ip:10.0.0.0/8 all         #
    deny       all                      subscribe   $SYS/#  eq:#
    deny       client:rogue             publish     #

- verdict: ``allow`` or ``deny``.
- who: ``all``, or conditions joined by ``,`` that must all hold: ``user:NAME``
  (the CONNECT username), ``client:ID`` (the client identifier), ``ip:ADDR`` or
  ``ip:CIDR`` (the peer address).
- action: ``publish``, ``subscribe`` or ``all``.
- topics: topic filters. ``%u`` and ``%c`` are replaced by the username and the
  client id (a rule naming ``%u`` never matches a client without a username);
  ``eq:FILTER`` matches that filter literally (``eq:#`` is a subscription to
  ``#`` itself, not every filter).

A rule applies to a PUBLISH when its filter matches the topic, and to a SUBSCRIBE
when its filter covers every topic the requested filter can match (``a/+`` is
covered by ``a/#`` and ``+/+`` but not by ``a/b``), as EMQX matches a filter
against a rule. The first rule that applies decides; none applying gives
``auth.acl_no_match``.

Cost: rules are parsed and split into levels once (per reload); a check walks
the rules in order, so it is O(rules x levels). The caller caches decisions per
(connection, action, topic), which is what makes it cheap on the publish path.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass

PUBLISH = 1
SUBSCRIBE = 2
ALL = PUBLISH | SUBSCRIBE
_ACTIONS = {"publish": PUBLISH, "subscribe": SUBSCRIBE, "all": ALL}

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AclError(Exception):
    """The ACL text is invalid; the message names the line."""


class Principal:
    """Who a connection is, for authorization: fixed when its CONNECT is accepted.

    Hashed by identity, so a decision cache keyed by it costs no tuple hashing.
    """

    __slots__ = ("client_id", "username", "ip", "rules", "__weakref__")

    def __init__(self, client_id: str, username: str | None, ip: IPAddress | None) -> None:
        self.client_id = client_id
        self.username = username
        self.ip = ip
        # this connection's own rules (from a database ACL query at CONNECT), asked
        # before the ACL file
        self.rules: list[Rule] | None = None

    def __repr__(self) -> str:
        return f"Principal({self.client_id!r}, {self.username!r}, {self.ip})"


@dataclass(frozen=True, slots=True)
class _Topic:
    text: str
    levels: tuple[str, ...]
    eq: bool
    placeholders: bool


@dataclass(frozen=True, slots=True)
class Rule:
    allow: bool
    actions: int
    users: tuple[str, ...]
    clients: tuple[str, ...]
    networks: tuple[IPNetwork, ...]
    topics: tuple[_Topic, ...]
    line: int

    def applies_to(self, who: Principal) -> bool:
        if self.users and who.username not in self.users:
            return False
        if self.clients and who.client_id not in self.clients:
            return False
        if self.networks:
            ip = who.ip
            if ip is None or not any(ip in net for net in self.networks):
                return False
        return True


def parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _parse_who(text: str, lineno: int) -> tuple[tuple[str, ...], tuple[str, ...], tuple[IPNetwork, ...]]:
    users: list[str] = []
    clients: list[str] = []
    nets: list[IPNetwork] = []
    if text == "all":
        return (), (), ()
    for part in text.split(","):
        kind, sep, value = part.partition(":")
        if not sep or not value:
            raise AclError(f"line {lineno}: {part!r} is not all, user:NAME, client:ID or ip:CIDR")
        if kind == "user":
            users.append(value)
        elif kind == "client":
            clients.append(value)
        elif kind == "ip":
            try:
                nets.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                raise AclError(f"line {lineno}: {value!r} is not an IP address or CIDR") from None
        else:
            raise AclError(f"line {lineno}: unknown condition {kind!r} (user, client or ip)")
    if len(users) > 1 or len(clients) > 1:
        # conditions are ANDed: two users can never both hold
        raise AclError(f"line {lineno}: a rule names one user and one client at most")
    return tuple(users), tuple(clients), tuple(nets)


def _parse_topic(text: str, lineno: int) -> _Topic:
    eq = text.startswith("eq:")
    if eq:
        text = text[3:]
    if not text:
        raise AclError(f"line {lineno}: empty topic")
    return _Topic(text, tuple(text.split("/")), eq, "%u" in text or "%c" in text)


def parse_acl(text: str) -> list[Rule]:
    rules = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        if raw.lstrip().startswith("#"):
            continue
        try:
            fields = shlex.split(raw)
        except ValueError as err:
            raise AclError(f"line {lineno}: {err}") from None
        if not fields:
            continue
        if len(fields) < 4:
            raise AclError(f"line {lineno}: expected 'allow|deny WHO ACTION TOPIC...'")
        verdict, who, action, *topics = fields
        if verdict not in ("allow", "deny"):
            raise AclError(f"line {lineno}: {verdict!r} is not allow or deny")
        if action not in _ACTIONS:
            raise AclError(f"line {lineno}: {action!r} is not publish, subscribe or all")
        users, clients, nets = _parse_who(who, lineno)
        rules.append(Rule(verdict == "allow", _ACTIONS[action], users, clients, nets,
                          tuple(_parse_topic(t, lineno) for t in topics), lineno))
    return rules


def _topic_matches(rule: tuple[str, ...], topic: list[str]) -> bool:
    """A rule filter against a topic name, by MQTT matching (no '$' special case: the
    rule's author wrote the filter for exactly this purpose)."""
    n = len(topic)
    for i, r in enumerate(rule):
        if r == "#":
            return True
        if i >= n:
            return False
        if r != "+" and r != topic[i]:
            return False
    return len(rule) == n


def _covers(rule: tuple[str, ...], filt: list[str]) -> bool:
    """Every topic ``filt`` can match is matched by ``rule``."""
    n = len(filt)
    for i, r in enumerate(rule):
        if r == "#":
            return True
        if i >= n:
            return False
        f = filt[i]
        if f == "#":
            return False
        if r == "+":
            continue
        if f == "+" or f != r:
            return False
    return len(rule) == n


def _expand(t: _Topic, who: Principal) -> tuple[str, ...] | None:
    if not t.placeholders:
        return t.levels
    text = t.text
    if "%u" in text:
        if who.username is None:
            return None
        text = text.replace("%u", who.username)
    text = text.replace("%c", who.client_id)
    return tuple(text.split("/"))


class Acl:
    def __init__(self, rules: list[Rule], no_match_allows: bool) -> None:
        self.rules = rules
        self.no_match_allows = no_match_allows

    @classmethod
    def from_text(cls, text: str, no_match_allows: bool) -> Acl:
        return cls(parse_acl(text), no_match_allows)

    def check(self, who: Principal, action: int, topic: str) -> bool:
        """Whether ``who`` may ``action`` (PUBLISH a topic name / SUBSCRIBE a filter)."""
        verdict = first_match(self.rules, who, action, topic)
        return self.no_match_allows if verdict is None else verdict


def first_match(rules: list[Rule], who: Principal, action: int, topic: str) -> bool | None:
    """The verdict of the first rule that applies, None if none does."""
    levels = topic.split("/")
    for rule in rules:
        if not rule.actions & action or not rule.applies_to(who):
            continue
        for t in rule.topics:
            expanded = _expand(t, who)
            if expanded is None:
                continue
            if t.eq:
                hit = "/".join(expanded) == topic
            elif action == PUBLISH:
                hit = _topic_matches(expanded, levels)
            else:
                hit = _covers(expanded, levels)
            if hit:
                return rule.allow
    return None


def rules_from_rows(rows: list[tuple[str, str, str]]) -> tuple[list[Rule], list[str]]:
    """Rules from database rows (permission, action, topic), in the order given, each
    applying to the connection it was fetched for (so no user/client/ip condition).
    A topic may start ``eq `` (EMQX's form) or ``eq:``. Returns the rules and a note per
    row that was skipped."""
    rules: list[Rule] = []
    bad: list[str] = []
    for i, (permission, action, topic) in enumerate(rows, 1):
        permission = str(permission).strip().lower()
        action = str(action).strip().lower()
        topic = str(topic).strip()
        if topic.startswith("eq "):
            topic = "eq:" + topic[3:].lstrip()
        if permission not in ("allow", "deny") or action not in _ACTIONS or topic in ("", "eq:"):
            bad.append(f"row {i}: {permission!r} {action!r} {topic!r}")
            continue
        rules.append(Rule(permission == "allow", _ACTIONS[action], (), (), (),
                          (_parse_topic(topic, i),), i))
    return rules, bad
