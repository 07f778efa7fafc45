"""The admin listener of ``serve --workers``: one address for ops, N workers behind it.

The supervisor listens on ``admin.listen`` and asks the workers over their
private unix sockets:

- ``/healthz``: the supervisor is alive (with how many workers are serving).
- ``/readyz``: 200 only when every worker is ready.
- ``/metrics``: every worker's metrics, each sample labelled ``worker="<i>"``
  (sum or max over ``worker`` for service totals), plus ``credproxy_workers``
  (configured) and ``credproxy_workers_serving``. Each worker keeps its values
  in its own ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode);
  the supervisor asks every worker to render (which checks the caller's admin
  token and stores the scrape-time gauges), then merges the directories with
  ``MultiProcessCollector``. A restarted worker's counters carry on from its
  predecessor's.
- ``GET /v1/credentials``: one entry per credential, ``requests`` summed and
  ``last_used`` the latest over the workers, the state fields from worker 0,
  and ``workers``: each worker's own state.
- every other ``POST`` (refresh, revoke, disable, enable, probe, reload): sent to
  every worker; the answer is worker 0's when all agree, else the first one that
  did not succeed (a worker that cannot be reached answers 503).
- every other ``GET``: worker 0's answer.

The supervisor holds no admin token: it passes the caller's ``Authorization``
header on to the workers, which check it as a single process does (token
rotation on reload included); a refusal is answered as the worker gave it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.config.models import AdminConfig

log = logging.getLogger("credproxy.workers")

POLL_INTERVAL = 0.1
CALL_TIMEOUT = 30.0


def _json(data, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


class _Merged:
    """A collector that yields the families gathered from the workers at scrape time."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self):
        return self._families


def merge_metrics(directories: dict[int, str]) -> list[Metric]:
    """Families from each worker's multiprocess directory, every sample labelled with its worker.
    A gauge at NaN is a series the worker dropped (``proxy.observe.metrics.forget``): left out."""
    merged: dict[str, Metric] = {}
    for index, path in sorted(directories.items()):
        for family in MultiProcessCollector(None, path=path).collect():
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                if family.type == "gauge" and math.isnan(s.value):
                    continue
                into.samples.append(s._replace(labels={**s.labels, "worker": str(index)}))
    return list(merged.values())


def merge_credentials(answers: dict[int, dict]) -> dict:
    by_name: dict[str, dict] = {}
    for index, answer in sorted(answers.items()):
        for entry in answer.get("credentials", []):
            merged = by_name.get(entry["name"])
            if merged is None:
                merged = by_name[entry["name"]] = dict(entry, requests=0, last_used=None, workers=[])
            merged["requests"] += entry.get("requests") or 0
            if entry.get("last_used") is not None:
                merged["last_used"] = max(merged["last_used"] or 0, entry["last_used"])
            merged["workers"].append({k: entry.get(k) for k in ("state", "expires_in_s", "last_refresh", "last_error",
                                                                "requests")} | {"worker": index})
    return {"credentials": list(by_name.values())}


class WorkerAdmin:
    def __init__(self, supervisor, cfg: AdminConfig) -> None:
        self.sup = supervisor
        self.cfg = cfg
        self._runner: web.AppRunner | None = None
        self._sessions: dict[int, aiohttp.ClientSession] = {}
        self._poller: asyncio.Task | None = None

    # -- talking to workers -------------------------------------------------------------------------

    def _session(self, worker) -> aiohttp.ClientSession:
        s = self._sessions.get(worker.index)
        if s is None:
            s = self._sessions[worker.index] = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=worker.admin_socket),
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT))
        return s

    async def call(self, worker, method: str, path: str, body: bytes | None = None,
                   content_type: str | None = None, auth: str | None = None) -> tuple[int, str, bytes] | None:
        """(status, content type, body) from one worker; None when it cannot be reached."""
        headers = {"Authorization": auth} if auth else {}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            async with self._session(worker).request(method, f"http://worker{path}", data=body, headers=headers) as r:
                answer = r.status, r.headers.get("Content-Type", "application/json"), await r.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return None
        if not worker.serving:  # a worker opens its admin socket last: any answer means it is serving
            worker.serving = True
            log.info("worker serving", extra={"worker": worker.index})
        return answer

    async def _all(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                   auth: str | None = None):
        workers = self.sup.workers
        answers = await asyncio.gather(*(self.call(w, method, path, body, content_type, auth) for w in workers))
        return list(zip(workers, answers))

    @staticmethod
    def _refusal(answers) -> web.Response | None:
        """The first worker answer that is not a success (or 503 for one that cannot be reached)."""
        for w, a in answers:
            if a is None:
                return _json({"error": "unavailable", "message": f"worker {w.index} did not answer"}, 503)
        for _, (status, ctype, body) in answers:
            if not 200 <= status < 300:
                return web.Response(status=status, body=body, headers={"Content-Type": ctype, "Cache-Control": "no-store"})
        return None

    async def _poll_serving(self) -> None:
        """Mark workers serving once their admin socket answers (the supervisor restarts only those)."""
        while True:
            for w in self.sup.workers:
                if not w.serving and w.process is not None and w.process.returncode is None:
                    await self.call(w, "GET", "/healthz")
            await asyncio.sleep(POLL_INTERVAL)

    # -- endpoints ----------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        serving = sum(1 for w in self.sup.workers if w.serving)
        return _json({"status": "alive", "workers": len(self.sup.workers), "serving": serving})

    async def readyz(self, request: web.Request) -> web.Response:
        answers = await self._all("GET", "/readyz")
        per_worker, waiting = [], set()
        for w, a in answers:
            body = json.loads(a[2]) if a is not None and a[1].startswith("application/json") else {}
            ready = a is not None and a[0] == 200
            waiting.update(body.get("waiting", []) if a is not None else ["worker_unreachable"])
            per_worker.append({"worker": w.index, "ready": ready})
        ready = all(p["ready"] for p in per_worker) and not self.sup.stopping
        if self.sup.stopping:
            waiting.add("draining")
        return _json({"ready": ready, "waiting": sorted(waiting), "workers": per_worker}, 200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        answers = await self._all("GET", "/metrics", auth=request.headers.get("Authorization"))
        refused = [a for _, a in answers if a is not None and a[0] in (401, 403)]
        if refused:
            return self._refusal([(None, refused[0])])
        serving = sum(1 for _, a in answers if a is not None and a[0] == 200)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(merge_metrics({w.index: w.metrics_dir for w in self.sup.workers})))
        own = [GaugeMetricFamily("credproxy_workers", "Worker processes configured (serve --workers)",
                                 value=len(self.sup.workers)),
               GaugeMetricFamily("credproxy_workers_serving", "Worker processes answering right now", value=serving)]
        registry.register(_Merged(own))
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def credentials(self, request: web.Request) -> web.Response:
        answers = await self._all("GET", "/v1/credentials", auth=request.headers.get("Authorization"))
        refused = self._refusal(answers)
        if refused is not None:
            return refused
        return _json(merge_credentials({w.index: json.loads(a[2]) for w, a in answers}))

    async def forward(self, request: web.Request) -> web.Response:
        path, auth = request.rel_url.raw_path_qs, request.headers.get("Authorization")
        if request.method == "GET":
            w = self.sup.workers[0]
            answers = [(w, await self.call(w, "GET", path, auth=auth))]
        else:
            answers = await self._all(request.method, path, await request.read(), request.headers.get("Content-Type"),
                                      auth)
        refused = self._refusal(answers)
        if refused is not None:
            return refused
        status, ctype, body = answers[0][1]
        return web.Response(status=status, body=body, headers={"Content-Type": ctype, "Cache-Control": "no-store"})

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/credentials", self.credentials)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        listen = self.cfg.listen
        site = (web.UnixSite(self._runner, listen.unix) if listen.unix
                else web.TCPSite(self._runner, listen.host, listen.port))
        await site.start()
        self._poller = asyncio.get_running_loop().create_task(self._poll_serving())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        for s in self._sessions.values():
            await s.close()
