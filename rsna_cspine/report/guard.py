"""Who may talk to the viewer: the Host, cross-site and framing checks in front of every route.

The viewer serves patient images on 127.0.0.1, so a web page in the user's browser is the threat:

* **DNS rebinding**: a page of ``evil.example`` whose name now resolves to 127.0.0.1 reads the viewer as
  same-origin; its requests carry ``Host: evil.example``. Only the bound address (``127.0.0.1`` or
  ``localhost`` with the bound port) is answered.
* **Cross-site requests** (CSRF): a page posts a form or fetches a picture. A state-changing request is
  refused when ``Sec-Fetch-Site`` says another site, or when ``Origin`` (else ``Referer``) is not the
  viewer's own origin; a read is refused when the browser says another site asked for it outside a
  top-level navigation. The forms also carry a per-process token (checked by the routes).
* **Framing and injected scripts**: every answer carries ``X-Frame-Options``, a Content-Security-Policy
  whose scripts need the per-response nonce (``request.state.csp_nonce``), ``nosniff``, a same-origin
  resource policy and ``Cache-Control: no-store``.

Written as a small ASGI middleware because Starlette's ``TrustedHostMiddleware`` ignores the port and no
library checks the Fetch Metadata and Origin headers together.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Host names the viewer answers to (it binds 127.0.0.1 only).
LOCAL_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
#: Methods that change nothing; every other method must come from the viewer's own pages.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: ``refuse(request, status, message)``: the answer to a refused request (HTML or JSON, as the app likes).
Refusal = Callable[[Request, int, str], Response]


def security_headers(nonce: str) -> list[tuple[bytes, bytes]]:
    """The headers every answer carries.

    Args:
        nonce: this response's script nonce (inline scripts without it do not run).
    """
    policy = (
        f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    )
    return [
        (b"content-security-policy", policy.encode()),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"cross-origin-resource-policy", b"same-origin"),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"cache-control", b"no-store"),
    ]


def _plain_refusal(request: Request, status: int, message: str) -> Response:
    return PlainTextResponse(message, status_code=status)


class RequestGuard:
    """ASGI middleware that refuses foreign hosts and cross-site requests and adds the security headers.

    Args:
        app: the application behind it.
        hosts: host names answered (with the port the server is bound to).
        refuse: builds the answer to a refused request (default plain text).
    """

    def __init__(self, app: ASGIApp, hosts: Sequence[str] = LOCAL_HOSTS, refuse: Refusal = _plain_refusal) -> None:
        self.app = app
        self.hosts = tuple(h.lower() for h in hosts)
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})["csp_nonce"] = nonce
        extra = security_headers(nonce)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in extra}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + extra}
            await send(message)

        problem = self.problem(scope)
        if problem is not None:
            response = self.refuse(Request(scope, receive), *problem)
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def problem(self, scope: Scope) -> tuple[int, str] | None:
        """Why the request is refused, as ``(status, message)``, or None when it may pass.

        Args:
            scope: the request's ASGI scope (``server`` holds the bound address and port).
        """
        headers = Headers(scope=scope)
        host = headers.get("host", "").strip().lower()
        server = scope.get("server")
        port = server[1] if server else None
        if not self._is_local(host, port):
            where = "127.0.0.1" + (f":{port}" if port else "")
            return 400, f"unknown Host header: this viewer answers only at http://{where}/ (or localhost)"
        own_origin = f"http://{host}"
        site = headers.get("sec-fetch-site", "").lower()
        if scope["method"] in SAFE_METHODS:
            navigation = headers.get("sec-fetch-mode", "") == "navigate" and headers.get("sec-fetch-dest", "document") == "document"
            if site in ("cross-site", "same-site") and not navigation:
                return 403, f"request from another site refused (Sec-Fetch-Site: {site})"
            return None
        if site and site not in ("same-origin", "none"):
            return 403, f"request from another site refused (Sec-Fetch-Site: {site})"
        origin = headers.get("origin")
        if origin is not None:
            if origin.strip().lower() != own_origin:
                return 403, "request from another site refused (its Origin is not this viewer)"
        elif (referer := headers.get("referer")) is not None:
            parts = urlsplit(referer.strip())
            if f"{parts.scheme}://{parts.netloc}".lower() != own_origin:
                return 403, "request from another site refused (its Referer is not this viewer)"
        return None

    def _is_local(self, host: str, port: int | None) -> bool:
        """Whether a Host header names this server: an allowed name and the bound port."""
        try:
            parts = urlsplit(f"//{host}")
            name, given = parts.hostname, parts.port
        except ValueError:  # a port that is not a number
            return False
        if name not in self.hosts or parts.username is not None or parts.path:
            return False
        return port is None or (given or 80) == port
