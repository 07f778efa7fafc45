"""What credproxy's features cost without its plumbing: the llhttp floor (tests/bench/llhttp_floor.py) with
credproxy's real per-request calls added in the floor's own structure — caller authentication (token digest),
route, policy, request ID, header material, audit line, alerts, metrics, the state holder, the leak guard's
check of the answer — driven in process like tests/bench/inproc.py (no sockets). An experiment, not a proxy:
no limits, no framing checks, no refusals. The gap between this and inproc.py is credproxy's plumbing.

    python tests/bench/feature_floor.py [REQUESTS]

Instructions per request: run it under ``valgrind --tool=callgrind`` with 3000 and with 500 requests and divide
the difference by 2500 (as for inproc.py).
"""

import sys

sys.path.pop(0)  # this folder holds a profile.py of its own: inproc's cProfile needs the standard library's
import asyncio  # noqa: E402
import cProfile  # noqa: E402,F401
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import inproc  # noqa: E402
import llhttp_floor  # noqa: E402

async def run(requests, runs):
    from proxy.routing import route_prefixed
    from proxy.observe.request_id import new_request_id

    proxy = await inproc.started_proxy()
    holder = proxy.holder
    cred = holder.current.credentials["bench"]
    await cred.source.grant("")

    class Up(llhttp_floor.Upstream):
        def on_message_begin(self):
            self.headers, self.chunked, self.body = [], False, b""
        def on_body(self, body):
            self.body += body
        def on_headers_complete(self):
            pass
        def on_message_complete(self):
            caller, self.caller = self.caller, None
            ex = caller.ex
            cred = ex["cred"]; grant = ex["grant"]
            cred.metrics.upstream_duration.observe(time.monotonic() - ex["sent"])
            data = self.body
            if grant.guard.active and grant.guard.may_match(data):
                raise SystemExit("match")
            head = b"HTTP/1.1 %d %s\r\n%sX-Request-Id: %s\r\nContent-Length: %d\r\n\r\n" % (
                self.parser.get_status_code(), self.reason, b"".join(self.headers), ex["rid"].encode(), len(data))
            caller.transport.writelines((head, data))
            if self.parser.should_keep_alive():
                self.pool.append(self)
            st = ex["state"]
            dur = time.monotonic() - ex["t0"]
            route = ex["route"]
            st.audit.write_request(ex["rid"], ex["caller"].name, "127.0.0.1", route.credential, "GET", route.path,
                                   200, "allowed", "allowed", dur * 1000, False)
            if st.alerts is not None:
                st.alerts.observe_request(ex["rid"], ex["caller"].name, "127.0.0.1", route.credential, "GET", route.path, 200, "allowed")
            cred.metrics.record(ex["caller"].name, 200, dur)
            holder.leave(st, caller.token)
            caller.answered()

    class C(llhttp_floor.Caller):
        def on_message_begin(self):
            self.url, self.headers, self.body, self.first = b"", [], [], {}
        def on_header(self, name, value):
            low = name.lower()
            self.first[low.decode()] = value.decode()
            if low not in llhttp_floor.HOP:
                self.headers.append(b"%s: %s\r\n" % (name, value))
        def on_message_complete(self):
            t0 = time.monotonic()
            rid = new_request_id()
            self.token = object()
            st = holder.enter(self.token)
            st.audit.admit()
            route = route_prefixed(self.url.decode())
            caller = st.authenticator.authenticate(self.first, None, None)
            st.authenticator.check_source(caller, None)
            cred = st.credentials.get(route.credential)
            if not st.policy.allowed(caller.name, cred.name, "GET", route.path, None):
                raise SystemExit("policy")
            cred.touch()
            grant = cred.source.ready(cred.principal(caller.name))
            injected = cred.injector.header_line(grant.values)
            self.ex = dict(t0=t0, rid=rid, state=st, route=route, caller=caller, cred=cred, grant=grant, sent=time.monotonic())
            head = b"%s /%s HTTP/1.1\r\nHost: %s\r\n%s%sX-Request-Id: %s\r\n\r\n" % (
                self.parser.get_method(), route.path.encode(), self.proxy.host, b"".join(self.headers), injected, rid.encode())
            self.queue.append(head)
            if not self.busy:
                self.busy = True
                self.forward_now()
        def forward_now(self):
            up = self.proxy.pool.pop()
            self.upstream, up.caller = up, self
            up.transport.write(self.queue.pop(0))
        def answered(self):
            self.upstream = None
            self.busy = False

    f = llhttp_floor.Floor("http://127.0.0.1:9")
    upstream = inproc.Wire(inproc.ANSWER)
    up = Up(f.pool); up.transport = upstream; upstream.protocol = up; f.pool.append(up)
    caller = inproc.Wire()
    c = C(f); c.transport = caller
    times = []
    for _ in range(runs):
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        for i in range(requests):
            c.data_received(inproc.REQUEST)
            upstream.deliver()
            if i % 256 == 255:
                await asyncio.sleep(0)
        times.append((time.perf_counter() - start) / requests)
    assert caller.written >= requests * len(inproc.BODY)
    await proxy.stop()
    return times

if __name__ == "__main__":
    import uvloop

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    t = uvloop.run(run(n, 1 if n < 10000 else 5))
    print("feature floor: %.1f us/request (min; all %s)" % (min(t) * 1e6, " ".join("%.1f" % (x * 1e6) for x in t)))
