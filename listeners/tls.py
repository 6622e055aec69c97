"""TLS for the TLS and WSS listeners: a server SSLContext from plain arguments,
and the client certificate's identity. Knows nothing of MQTT or of shoal's config.

The record layer itself is the event loop's (``create_server(ssl=...)``): uvloop
runs it in C, which no Python layer here could match. The loops report a failed
handshake (a plain-text client, garbage, a missing or untrusted client
certificate, an old TLS version) to nobody unless in debug mode, so the context's
SSLObject class logs it: one line per failed handshake, never per record.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from listeners.adapter import Layer

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


class TlsLayer(Layer):
    """TLS as a layer, over an ``ssl.MemoryBIO`` pair, for where the TLS handshake does not
    start the connection: behind a PROXY protocol header (``ProxyProtocolLayer(TlsLayer(
    inner))``), which the loop's own TLS (``create_server(ssl=...)``) cannot skip over.

    The record layer runs in Python here (the crypto stays in OpenSSL), so it costs more
    per record than uvloop's; listeners without a PROXY header keep the loop's TLS.

    Unlike the other layers, the inner protocol is told of the connection only once the
    handshake is done, as the loop's TLS does, so that it sees the client certificate at
    ``connection_made``; a handshake that stalls is therefore bounded by this layer's own
    timer (``handshake_timeout``, the listener passes the MQTT connect timeout).
    """

    def __init__(self, inner: asyncio.Protocol, context: ssl.SSLContext,
                 handshake_timeout: float) -> None:
        super().__init__(inner)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self._done = False
        self._timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._stalled)

    def _stalled(self) -> None:
        self._timer = None
        if not self._done:
            log.info("TLS handshake from %s not done within %.1fs; closing", self.peer_text(),
                     self._timeout)
            self._fail()

    def _fail(self) -> None:
        self._flush()  # an alert, if OpenSSL wrote one
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        if self._out.pending and self.transport is not None:
            self.transport.write(self._out.read())

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._in.write(data)
        sslobj = self._ssl
        if not self._done:
            try:
                sslobj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, ssl.CertificateError, OSError):
                self._fail()  # _LoggedSSLObject wrote the log line
                return
            self._done = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._flush()
            self._extra.update(ssl_object=sslobj, peercert=sslobj.getpeercert(),
                               cipher=sslobj.cipher(), compression=sslobj.compression())
            self._inner_made = True
            self.inner.connection_made(self)  # type: ignore[arg-type]
            if self._closing:
                return  # the inner protocol refused the connection at once
        chunks = []
        eof = False
        while True:
            try:
                chunk = sslobj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify
                eof = True
                break
            except (ssl.SSLError, OSError) as err:
                log.info("TLS error from %s: %s; closing", self.peer_text(), err)
                self._fail()
                return
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        self._flush()  # e.g. a TLS 1.3 key update answer, or session tickets
        if chunks and self._inner_made:
            self.inner.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof and self._inner_made and not self._closing:
            if not self.inner.eof_received():
                self.close()

    def eof_received(self) -> bool | None:
        if self._inner_made:
            return self.inner.eof_received()
        return None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not self._done:
            return
        try:
            self._ssl.write(data)
        except (ssl.SSLError, OSError) as err:
            log.info("TLS error writing to %s: %s; closing", self.peer_text(), err)
            self._fail()
            return
        self._flush()

    def close(self) -> None:
        if self._done and not self._closing:
            try:
                self._ssl.unwrap()  # queues our close_notify
            except (ssl.SSLError, OSError):
                pass
            self._flush()
        super().close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)
