"""The sidecar's HTTP data path: ingress reverse proxy and egress forward proxy.

Why aiohttp's low-level server for ingress: the router, middlewares and access log of a
full ``web.Application`` cost time on every request and bring nothing to a catch-all
proxy. One ``ClientSession`` with a keep-alive pool is reused for the upstream and every
dependency. Per request the proxy does: route template lookup (cached), an O(1)
enforcement decision, the forward, and one telemetry ``record()`` (a deque append).

Egress: a service calls its dependency NAME through
``http://<admin-host>:<admin-port>/_egress/NAME/<path>`` (path prefix on the sidecar's
local admin listener, so one port serves every dependency); an isolated dependency
fails fast with 503 and ``X-Stanch-Isolated: NAME``.

Telemetry (``schemas.records.RequestEvent``): a request Stanch itself refused (throttle
429, shed or isolate 503) is sent with ``error: false``: it is still counted (the series
keeps seeing the offered load), but it is not a failure of the service or of the
dependency, so an isolation's own fail-fast answers cannot look like the dependency still
failing while its half-open probes succeed. A forward that timed out or could not connect
is ``error: true`` whatever its status; otherwise the status decides (>= 500 is an error).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from app.sidecar.telemetry import TelemetryPublisher
from models.enforcement import Decision, EnforcementTable, RouteMatcher

EGRESS_PREFIX = "/_egress/"

#: Largest body (of known length) read whole instead of streamed. 64 KiB: almost every
#: API request and response fits, and costs one buffer and one write as before; it stays
#: far below aiohttp's 1 MiB ``client_max_size`` that ``request.read()`` enforces.
WHOLE_BODY_MAX = 64 * 1024
#: Piece size of a streamed body: at most this much per request sits in the sidecar.
#: 64 KiB matches aiohttp's read buffer, so a chunk is one socket read.
CHUNK = 64 * 1024

# RFC 9110 section 7.6.1 hop-by-hop headers, plus the ones aiohttp recomputes.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)


def _forward_headers(headers: Any) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP)


class ProxyCounters:
    """Plain integers read by the metrics collector at scrape time (no hot-path cost)."""

    __slots__ = (
        "egress_isolated", "egress_passed", "ingress_passed", "ingress_shed",
        "ingress_throttled", "upstream_errors",
    )

    def __init__(self) -> None:
        self.ingress_passed = 0
        self.ingress_throttled = 0
        self.ingress_shed = 0
        self.egress_passed = 0
        self.egress_isolated = 0
        self.upstream_errors = 0


class Proxy:
    """Ingress and egress handlers sharing one enforcement table and one publisher."""

    def __init__(
        self,
        *,
        service: str,
        upstream: str,
        dependencies: dict[str, str],
        table: EnforcementTable,
        telemetry: TelemetryPublisher,
        route_templates: list[str],
        instance: str,
        version: str = "",
        region: str = "",
        upstream_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self._clock = clock  # epoch seconds for leases and event times (wall, or simulated)
        self.upstream = upstream.rstrip("/")
        self.dependencies = {name: url.rstrip("/") for name, url in dependencies.items()}
        self.table = table
        self.telemetry = telemetry
        self.ingress_routes = RouteMatcher(route_templates)
        self.egress_routes = RouteMatcher(route_templates)
        self.counters = ProxyCounters()
        self.upstream_timeout_s = upstream_timeout_s
        self._base_event: dict[str, Any] = {"service": service, "instance": instance}
        if version:
            self._base_event["version"] = version
        if region:
            self._base_event["region"] = region
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # pass bodies through byte for byte
            timeout=aiohttp.ClientTimeout(total=self.upstream_timeout_s),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ handlers
    async def ingress(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        now = self._clock()
        route = self.ingress_routes.match(request.path)
        decision = self.table.decide_ingress(route, now)
        failed: bool | None
        if decision.status:
            response, failed = self._refuse(decision), False
            if decision.status == 429:
                self.counters.ingress_throttled += 1
            else:
                self.counters.ingress_shed += 1
        else:
            response, failed = await self._forward(request, self.upstream + request.raw_path)
            self.counters.ingress_passed += 1
        self._record(now, route, request.method, response.status, failed, started, None)
        return response

    async def egress(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        now = self._clock()
        raw = request.raw_path
        name, _, rest = raw[len(EGRESS_PREFIX):].partition("/")
        base = self.dependencies.get(name)
        if base is None:
            return web.Response(status=404, text=f"unknown dependency {name!r}\n")
        rest = "/" + rest
        path = rest.split("?", 1)[0]
        route = self.egress_routes.match(path)
        decision = self.table.decide_egress(name, now)
        failed: bool | None
        if decision.status:
            response, failed = self._refuse(decision), False
            self.counters.egress_isolated += 1
        else:
            response, failed = await self._forward(request, base + rest)
            self.counters.egress_passed += 1
        self._record(now, route, request.method, response.status, failed, started, name)
        return response

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _refuse(decision: Decision) -> web.StreamResponse:
        headers: dict[str, str] = {"X-Stanch-Enforcement": decision.reason}
        if decision.retry_after_s:
            headers["Retry-After"] = str(decision.retry_after_s)
        if decision.isolated:
            headers["X-Stanch-Isolated"] = decision.isolated
        return web.Response(status=decision.status, text=decision.reason + "\n", headers=headers)

    async def _forward(
        self, request: web.BaseRequest, url: str
    ) -> tuple[web.StreamResponse, bool | None]:
        """Forward one request; the second value is telemetry's ``error`` (True when the
        forward itself failed, None when the upstream's status decides).

        Bodies of any size pass in both directions: up to ``WHOLE_BODY_MAX`` bytes of
        known length they are read whole (one buffer, one write: the common case, and the
        cheapest), anything larger or of unknown length is streamed in ``CHUNK`` pieces,
        so the sidecar holds at most a chunk per request and adds no size limit of its own
        (aiohttp's ``client_max_size`` of 1 MiB applies only to ``request.read()``, which
        answered 413 to every larger upload)."""
        session = self._session
        assert session is not None, "Proxy.start() was not awaited"
        headers = _forward_headers(request.headers)
        data: Any = None
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= WHOLE_BODY_MAX:
                data = await request.read()
            else:
                data = request.content  # streamed; chunked upstream when no length
                if length is not None:
                    headers["Content-Length"] = str(length)  # keep the client's framing
        try:
            async with session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False
            ) as resp:
                length = resp.content_length
                if (length is not None and length <= WHOLE_BODY_MAX) or (
                    request.method == "HEAD" or resp.status in (204, 304)
                ):
                    payload = await resp.read()
                    response = web.Response(
                        status=resp.status, body=payload, headers=_forward_headers(resp.headers)
                    )
                    return response, None
                return await self._stream_back(request, resp)
        except TimeoutError:
            self.counters.upstream_errors += 1
            return web.Response(status=504, text="upstream timed out\n"), True
        except aiohttp.ClientError as exc:
            self.counters.upstream_errors += 1
            text = f"upstream unreachable: {type(exc).__name__}"
            return web.Response(status=502, text=f"{text}\n"), True

    async def _stream_back(
        self, request: web.BaseRequest, resp: aiohttp.ClientResponse
    ) -> tuple[web.StreamResponse, bool | None]:
        """Copy a large (or unknown-length) upstream body to the client chunk by chunk.

        The status and headers are sent first, so an upstream that fails mid-body can no
        longer be answered 502: the client's connection is closed instead (a short body,
        never a complete-looking wrong one) and the event is an error. A client that goes
        away mid-body just ends the copy."""
        response = web.StreamResponse(status=resp.status, headers=_forward_headers(resp.headers))
        if resp.content_length is not None:
            response.content_length = resp.content_length
        try:
            await response.prepare(request)
            async for chunk in resp.content.iter_chunked(CHUNK):
                await response.write(chunk)
        except ConnectionError:  # the client went away: nothing left to answer
            return response, None
        except (TimeoutError, aiohttp.ClientError):
            self.counters.upstream_errors += 1
            if request.transport is not None:
                request.transport.close()
            return response, True
        return response, None

    def _record(
        self,
        now: float,
        route: str,
        method: str,
        status: int,
        failed: bool | None,
        started: float,
        dependency: str | None,
    ) -> None:
        event = dict(self._base_event)
        # ts is when the request finished (the schema's meaning; on the sidecar's clock,
        # which may be simulated): stamped at its start (``now``), a slow request fell
        # behind the watermark its fast neighbours had pushed on and was dropped as late
        event["ts"] = self._clock()
        event["route"] = route
        event["method"] = method
        event["status"] = status
        event["latency_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
        if dependency is not None:
            event["dependency"] = dependency
        if failed is not None:
            event["error"] = failed
        self.telemetry.record(event)
