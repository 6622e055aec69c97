"""TLS for the TLS and WSS listeners: a server SSLContext from plain arguments,
and the client certificate's identity. Knows nothing of MQTT or of shoal's config.

The record layer itself is the event loop's (``create_server(ssl=...)``): uvloop
runs it in C, which no Python layer here could match. The loops report a failed
handshake (a plain-text client, garbage, a missing or untrusted client
certificate, an old TLS version) to nobody unless in debug mode, so the context's
SSLObject class logs it: one line per failed handshake, never per record.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

log = logging.getLogger("shoal.tls")

VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class _LoggedSSLObject(ssl.SSLObject):
    """An SSLObject whose failed handshake leaves a log line (the peer address is not
    known at this level; the reason is)."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as err:
            log.info("TLS handshake failed: %s; closing", err.reason or err)
            raise


def server_context(certfile: str, keyfile: str = "", cafile: str = "",
                   verify_client: str = "none", min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server context: our certificate chain, TLS ``min_version`` or newer, and client
    certificates checked against ``cafile`` when ``verify_client`` is optional/required.

    Raises OSError (ssl.SSLError, FileNotFoundError) for unreadable or mismatched files and
    ValueError for arguments that make no sense together.
    """
    if verify_client not in VERIFY:
        raise ValueError(f"verify_client must be one of {', '.join(VERIFY)}")
    if min_version not in VERSIONS:
        raise ValueError(f"min_version must be one of {', '.join(VERSIONS)}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.sslobject_class = _LoggedSSLObject
    ctx.load_cert_chain(certfile, keyfile or None)
    if verify_client != "none":
        if not cafile:
            raise ValueError("verifying client certificates needs a CA file")
        ctx.load_verify_locations(cafile=cafile)
        ctx.verify_mode = VERIFY[verify_client]
    return ctx


def peer_identity(cert: dict[str, Any] | None, source: str) -> str | None:
    """The name a verified client certificate (``getpeercert()``) gives its holder:
    ``cn`` the subject's commonName, ``san`` its first DNS, email or URI subject
    alternative name; None when there is no certificate or no such name."""
    if not cert or source == "none":
        return None
    if source == "cn":
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return None
    if source == "san":
        names = cert.get("subjectAltName", ())
        for kind in ("DNS", "email", "URI"):
            for k, value in names:
                if k == kind:
                    return str(value)
        return None
    raise ValueError(f"unknown certificate name source {source!r}")
