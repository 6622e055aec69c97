"""The ``shoal`` command.

Each subcommand is registered by a function that adds its parser and sets
``handler``; adding ``shoal pub``/``sub``/``bench``/``user`` later means writing
one more ``register_*`` function and listing it in ``COMMANDS``. ``shoal bench`` hands its
arguments to ``bench.emqtt`` (imported only then). Heavy modules
(the broker's event loop, uvloop) are imported inside the handler that needs
them, so ``shoal config check`` stays fast and works where they are missing.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from shards.config import Config, ConfigError, example_toml, load_config, render_docs, to_toml

Handler = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_INVALID_CONFIG = 1
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_NOT_FOUND = 3  # `shoal user del` / `shoal ban del` of something that is not there


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", default=None,
                        help="TOML configuration file (default: $SHOAL_CONFIG, else the "
                             "built-in defaults); SHOAL_<SECTION>__<KEY> variables override it")


# -- shoal broker --------------------------------------------------------------------------


def _run_broker(args: argparse.Namespace) -> int:
    # Imported here: the worker pulls in the event loop and the whole broker, which the
    # config subcommands have no use for.
    worker = importlib.import_module("shards.worker")
    argv = ["--config", args.config] if args.config else []
    return int(worker.main(argv) or 0)


def register_broker(sub: Any) -> None:
    p = sub.add_parser("broker", help="run the broker in the foreground",
                       description="Run a one-process broker in the foreground: one shard that "
                                   "binds its own listeners (supervisor.conf instead runs a router "
                                   "and `python3 -m shards --index K --workers N`). Stop it with "
                                   "SIGTERM or Ctrl-C.")
    _config_option(p)
    p.set_defaults(handler=_run_broker)


# -- shoal config ----------------------------------------------------------------------------


def _config_show(args: argparse.Namespace) -> int:
    config = Config() if args.defaults else load_config(args.config)
    sys.stdout.write(example_toml() if args.defaults and args.comments
                     else to_toml(config, comments=args.comments))
    return EXIT_OK


def _config_check(args: argparse.Namespace) -> int:
    load_config(args.file)
    print(f"{args.file}: OK")
    return EXIT_OK


def _config_docs(args: argparse.Namespace) -> int:
    sys.stdout.write(render_docs())
    return EXIT_OK


def register_config(sub: Any) -> None:
    p = sub.add_parser("config", help="show, check or document the configuration",
                       description="Inspect shoal's configuration.")
    csub = p.add_subparsers(dest="config_command", metavar="{show,check,docs}", required=True)

    show = csub.add_parser("show", help="print the effective configuration as TOML",
                           description="Print the configuration the broker would run with: "
                                       "defaults, then the file, then SHOAL_* overrides.")
    _config_option(show)
    show.add_argument("--comments", action="store_true",
                      help="document every key in comments")
    show.add_argument("--defaults", action="store_true",
                      help="ignore the file and the environment: print the built-in defaults "
                           "(with --comments: the content of shoal.example.toml)")
    show.set_defaults(handler=_config_show)

    check = csub.add_parser("check", help="validate a configuration file",
                            description="Validate FILE (and any SHOAL_* overrides in the "
                                        "environment); exit 0 if valid, 1 if not.")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=_config_check)

    docs = csub.add_parser("docs", help="print the configuration reference (Markdown)",
                           description="Print docs/configuration.md, generated from the code.")
    docs.set_defaults(handler=_config_docs)


# -- shoal user ------------------------------------------------------------------------------


def _users_path(args: argparse.Namespace) -> str:
    cfg = load_config(args.config)
    name = cfg.auth.users_file
    return name if os.path.isabs(name) else os.path.join(cfg.runtime.data_dir, name)


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password is not None:
        return str(args.password)
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        print("shoal: the passwords differ", file=sys.stderr)
        return None
    return first


def _user_add(args: argparse.Namespace) -> int:
    from shards.users import add_user
    password = _read_password(args)
    if not password:
        print("shoal: no password given (use --password-stdin, or run on a terminal)",
              file=sys.stderr)
        return EXIT_USAGE
    path = _users_path(args)
    new = add_user(path, args.name, password)
    print(f"{'added' if new else 'changed the password of'} user {args.name!r} in {path}")
    return EXIT_OK


def _user_del(args: argparse.Namespace) -> int:
    from shards.users import delete_user
    path = _users_path(args)
    if not delete_user(path, args.name):
        print(f"shoal: no user {args.name!r} in {path}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(f"deleted user {args.name!r} from {path}")
    return EXIT_OK


def _user_hash(args: argparse.Namespace) -> int:
    from shards.users import hash_password
    password = _read_password(args)
    if not password:
        print("shoal: no password given (use --password-stdin, or run on a terminal)",
              file=sys.stderr)
        return EXIT_USAGE
    print(hash_password(password))
    return EXIT_OK


def _user_list(args: argparse.Namespace) -> int:
    from shards.users import read_users
    for name in sorted(read_users(_users_path(args))):
        print(name)
    return EXIT_OK


def register_user(sub: Any) -> None:
    p = sub.add_parser("user", help="manage the built-in user store",
                       description="Add, delete and list the users of the built-in store (a "
                                   "file of salted scrypt hashes, auth.users_file under "
                                   "runtime.data_dir). Running brokers notice changes within "
                                   "auth.reload_interval; enable the store with "
                                   "auth.backends = \"builtin\".")
    usub = p.add_subparsers(dest="user_command", metavar="{add,del,list,hash}", required=True)
    add = usub.add_parser("add", help="add a user or change its password")
    _config_option(add)
    add.add_argument("name")
    how = add.add_mutually_exclusive_group()
    how.add_argument("--password", help="the password (visible to other local users in the "
                                        "process list: prefer --password-stdin or the prompt)")
    how.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    add.set_defaults(handler=_user_add)
    delete = usub.add_parser("del", help="delete a user")
    _config_option(delete)
    delete.add_argument("name")
    delete.set_defaults(handler=_user_del)
    lst = usub.add_parser("list", help="list the usernames")
    _config_option(lst)
    lst.set_defaults(handler=_user_list)
    hsh = usub.add_parser("hash", help="print a password hash (for a database backend's table)")
    how = hsh.add_mutually_exclusive_group()
    how.add_argument("--password", help="the password (prefer --password-stdin or the prompt)")
    how.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    hsh.set_defaults(handler=_user_hash)


# -- shoal ban -------------------------------------------------------------------------------


def _banned_path(args: argparse.Namespace) -> str:
    cfg = load_config(args.config)
    name = cfg.auth.banned_file
    return name if os.path.isabs(name) else os.path.join(cfg.runtime.data_dir, name)


def _read_bans(path: str) -> list[dict[str, Any]]:
    from shards.security import parse_banned
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_banned(fh.read())
    except FileNotFoundError:
        return []


def _write_bans(path: str, bans: list[dict[str, Any]]) -> None:
    from shards.users import write_atomically
    write_atomically(path, json.dumps({"version": 1, "bans": bans}, indent=1) + "\n")


def _ban_add(args: argparse.Namespace) -> int:
    import ipaddress
    from shards.users import locked
    if args.kind == "address":
        try:
            ipaddress.ip_network(args.value, strict=False)
        except ValueError:
            print(f"shoal: {args.value!r} is not an address or CIDR", file=sys.stderr)
            return EXIT_USAGE
    path = _banned_path(args)
    until = time.time() + args.seconds if args.seconds else None
    with locked(path):
        bans = [b for b in _read_bans(path)
                if not (b["kind"] == args.kind and b["value"] == args.value)]
        bans.append({"kind": args.kind, "value": args.value, "until": until})
        _write_bans(path, bans)
    print(f"banned {args.kind} {args.value!r}" + (f" for {args.seconds:g}s" if until else ""))
    return EXIT_OK


def _ban_del(args: argparse.Namespace) -> int:
    from shards.users import locked
    path = _banned_path(args)
    with locked(path):
        bans = _read_bans(path)
        kept = [b for b in bans if not (b["kind"] == args.kind and b["value"] == args.value)]
        if len(kept) == len(bans):
            print(f"shoal: {args.kind} {args.value!r} is not banned", file=sys.stderr)
            return EXIT_NOT_FOUND
        _write_bans(path, kept)
    print(f"unbanned {args.kind} {args.value!r}")
    return EXIT_OK


def _ban_list(args: argparse.Namespace) -> int:
    now = time.time()
    for b in _read_bans(_banned_path(args)):
        until = b.get("until")
        if until is not None and until <= now:
            continue
        left = "forever" if until is None else f"{until - now:.0f}s left"
        print(f"{b['kind']}\t{b['value']}\t{left}")
    return EXIT_OK


def register_ban(sub: Any) -> None:
    p = sub.add_parser("ban", help="ban clients by client id, username or address",
                       description="Manage auth.banned_file under runtime.data_dir. A banned "
                                   "client's CONNECT is refused with 0x8A Banned (MQTT 3.1.1: "
                                   "return code 5). Every shard notices changes within "
                                   "auth.reload_interval.")
    bsub = p.add_subparsers(dest="ban_command", metavar="{add,del,list}", required=True)
    kinds = ("clientid", "username", "address")
    add = bsub.add_parser("add", help="ban a client id, username or address/CIDR")
    _config_option(add)
    add.add_argument("kind", choices=kinds)
    add.add_argument("value")
    add.add_argument("--for", dest="seconds", type=float, default=0.0, metavar="SECONDS",
                     help="lift the ban after this long (default: never)")
    add.set_defaults(handler=_ban_add)
    delete = bsub.add_parser("del", help="lift a ban")
    _config_option(delete)
    delete.add_argument("kind", choices=kinds)
    delete.add_argument("value")
    delete.set_defaults(handler=_ban_del)
    lst = bsub.add_parser("list", help="list the bans in force")
    _config_option(lst)
    lst.set_defaults(handler=_ban_list)


# -- shoal bench -----------------------------------------------------------------------------


def _run_bench(args: argparse.Namespace) -> int:
    # bench/ is a separate package the runtime never imports; only this subcommand loads it,
    # and it parses its own (emqtt-bench style) options: -h is the host there.
    try:
        emqtt = importlib.import_module("bench.emqtt")
    except ImportError as e:
        print(f"shoal bench: the bench package is not installed ({e})", file=sys.stderr)
        return EXIT_USAGE
    return int(emqtt.main(args.bench_args, prog="shoal bench") or 0)


def register_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="load-test an MQTT broker (emqtt-bench flags)",
                       add_help=False, prefix_chars="\0",
                       description="shoal bench conn|pub|sub [emqtt-bench options]; "
                                   "`shoal bench pub --help` lists them.")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_run_bench)


# -- shoal pub / shoal sub ---------------------------------------------------------------------

# Default ports per transport, as mosquitto_pub/sub and EMQX use them.
_DEFAULT_PORTS = {"tcp": 1883, "tls": 8883, "quic": 14567}


def _client_options(p: argparse.ArgumentParser) -> None:
    """The connection flags shoal pub and shoal sub share (mosquitto_pub/sub spellings)."""
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("-h", "--host", default="localhost", help="broker host (default localhost)")
    p.add_argument("-p", "--port", type=int, default=0,
                   help="broker port (default 1883, 8883 with --tls, 14567 with --quic)")
    p.add_argument("-i", "--id", dest="client_id", default="", help="client id (default: the "
                   "broker assigns one)")
    p.add_argument("-V", "--protocol-version", dest="version", default="mqttv311",
                   help="mqttv311 (or 311) or mqttv5 (or 5)")
    p.add_argument("-k", "--keepalive", type=int, default=60, help="keepalive seconds (default 60)")
    p.add_argument("-c", "--disable-clean-session", dest="clean", action="store_false",
                   help="keep the session: clean session / clean start off")
    p.add_argument("-q", "--qos", type=int, choices=(0, 1, 2), default=0, help="QoS (default 0)")
    p.add_argument("-u", "--username", default=None)
    p.add_argument("-P", "--pw", dest="password", default=None)
    p.add_argument("--quic", action="store_true",
                   help="MQTT over QUIC (UDP, TLS 1.3, ALPN mqtt; certificate not verified "
                        "unless --cafile is given)")
    p.add_argument("--tls", action="store_true", help="MQTT over TLS (TCP)")
    p.add_argument("--cafile", default=None, help="CA file: verify the broker's certificate")
    p.add_argument("--insecure", action="store_true",
                   help="TLS: do not verify the broker's certificate or host name")
    p.add_argument("--bind-address", default=None, help="local address to send from")
    p.add_argument("-d", "--debug", action="store_true",
                   help="print connection events (connected, subscribed, rebound) to stderr")


async def _client_connect(args: argparse.Namespace) -> Any:
    mqttclient = importlib.import_module("shards.mqttclient")
    version = mqttclient.parse_version(args.version)
    kind = "quic" if args.quic else "tls" if (args.tls or args.cafile) else "tcp"
    port = args.port or _DEFAULT_PORTS[kind]
    kwargs = dict(client_id=args.client_id, version=version, keepalive=args.keepalive,
                  clean_start=args.clean, username=args.username, password=args.password)
    if kind == "quic":
        client = await mqttclient.MQTTClient.connect_quic(
            args.host, port, insecure=not args.cafile, cafile=args.cafile,
            local_host=args.bind_address, **kwargs)
    else:
        ctx = None
        if kind == "tls":
            import ssl
            ctx = ssl.create_default_context(cafile=args.cafile)
            if args.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        client = await mqttclient.MQTTClient.connect_tcp(args.host, port, ssl_context=ctx,
                                                         local_host=args.bind_address, **kwargs)
    if args.debug:
        print(f"connected ({kind}) to {args.host}:{port}", file=sys.stderr, flush=True)
    return client


def _run_client(args: argparse.Namespace, coro_fn: Callable[[argparse.Namespace], Any]) -> int:
    import asyncio

    mqttclient = importlib.import_module("shards.mqttclient")
    try:
        return int(asyncio.run(coro_fn(args)))
    except KeyboardInterrupt:
        return EXIT_OK
    except (mqttclient.MQTTError, OSError, asyncio.TimeoutError, ValueError) as e:
        print(f"shoal {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


async def _pub(args: argparse.Namespace) -> int:
    if args.null_message:
        payloads: Any = [b""]
    elif args.stdin_lines:
        payloads = (line.rstrip(b"\n") for line in sys.stdin.buffer)
    elif args.message is not None:
        payloads = [args.message.encode()]
    else:
        print("shoal pub: give -m MESSAGE, -n or -l", file=sys.stderr)
        return EXIT_USAGE
    client = await _client_connect(args)
    try:
        for _ in range(max(1, args.repeat)):
            for payload in payloads:
                code = await client.publish(args.topic, payload, qos=args.qos, retain=args.retain)
                if code >= 0x80:
                    print(f"shoal pub: publish refused: reason 0x{code:02X}", file=sys.stderr)
                    return 1
                if args.repeat_delay:
                    import asyncio
                    await asyncio.sleep(args.repeat_delay)  # pacing a publisher, not a sync
    finally:
        await client.disconnect()
    return EXIT_OK


async def _sub(args: argparse.Namespace) -> int:
    import asyncio

    client = await _client_connect(args)
    codes = await client.subscribe([(t, args.qos) for t in args.topic])
    if any(c >= 0x80 for c in codes):
        print(f"shoal sub: subscription refused: {codes}", file=sys.stderr)
        await client.disconnect()
        return 1
    if args.debug:
        print(f"subscribed {args.topic} granted {codes}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    received = 0
    window = 0
    started = loop.time()
    next_tick = started + 1.0
    next_rebind = started + args.rebind_after if args.rebind_after > 0 else None
    out = sys.stdout
    try:
        while args.count <= 0 or received < args.count:
            now = loop.time()
            deadlines = [next_tick] if args.stats else []
            if next_rebind is not None:
                deadlines.append(next_rebind)
            wait = max(0.0, min(deadlines) - now) if deadlines else None
            try:
                msg = await asyncio.wait_for(client.messages.get(), wait)
            except asyncio.TimeoutError:
                msg = None
            if msg is None and not client.is_connected():
                print("shoal sub: connection lost", file=sys.stderr, flush=True)
                return 1
            now = loop.time()
            if msg is not None:
                received += 1
                window += 1
                if not args.stats:
                    payload = msg.payload.decode(errors="replace")
                    out.write(f"{msg.topic} {payload}\n" if args.verbose else payload + "\n")
                    out.flush()
            if args.stats and now >= next_tick:
                out.write(f"{now - started:6.1f}s {window:6d} msg/s  total {received}\n")
                out.flush()
                window = 0
                next_tick += 1.0
            if next_rebind is not None and now >= next_rebind:
                next_rebind = now + args.rebind_after
                if client.quic is not None:
                    addr = await client.quic.rebind(args.bind_address)
                    if args.debug:
                        print(f"rebound to {addr[0]}:{addr[1]}", file=sys.stderr, flush=True)
    finally:
        if client.is_connected():
            await client.disconnect()
    return EXIT_OK


def register_pub(sub: Any) -> None:
    p = sub.add_parser("pub", help="publish a message (mosquitto_pub flags; --quic for QUIC)",
                       add_help=False,
                       description="Publish one message (-m), an empty one (-n) or one per "
                                   "stdin line (-l) to TOPIC, over TCP, TLS or QUIC.")
    _client_options(p)
    p.add_argument("-t", "--topic", required=True)
    p.add_argument("-m", "--message", default=None)
    p.add_argument("-n", "--null-message", action="store_true", help="send an empty payload")
    p.add_argument("-l", "--stdin-line", dest="stdin_lines", action="store_true",
                   help="send each line of stdin as a message")
    p.add_argument("-r", "--retain", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="publish the message(s) this many times")
    p.add_argument("--repeat-delay", type=float, default=0.0, metavar="SECONDS",
                   help="wait between repeats")
    p.set_defaults(handler=lambda a: _run_client(a, _pub))


def register_sub(sub: Any) -> None:
    p = sub.add_parser("sub", help="subscribe and print messages (mosquitto_sub flags; --quic)",
                       add_help=False,
                       description="Subscribe to TOPIC(s) and print each message's payload "
                                   "(-v: topic and payload) over TCP, TLS or QUIC.")
    _client_options(p)
    p.add_argument("-t", "--topic", action="append", required=True, help="repeatable")
    p.add_argument("-C", "--count", type=int, default=0, help="exit after this many messages")
    p.add_argument("-v", "--verbose", action="store_true", help="print the topic too")
    p.add_argument("--stats", action="store_true",
                   help="print a per-second receive rate instead of the messages")
    p.add_argument("--rebind-after", type=float, default=0.0, metavar="SECONDS",
                   help="QUIC: move to a new local UDP port every SECONDS while receiving "
                        "(a client address change; the connection must survive it)")
    p.set_defaults(handler=lambda a: _run_client(a, _sub))


COMMANDS: list[Callable[[Any], None]] = [register_broker, register_config, register_user,
                                         register_ban, register_bench, register_pub, register_sub]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="shoal, an MQTT 3.1.1/5.0 broker.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as e:
        print(f"shoal: invalid configuration: {e}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    except BrokenPipeError:
        # `shoal config docs | head` closes the pipe early: not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
