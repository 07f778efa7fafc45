#!/usr/bin/env bash
# Quick start: install credproxy into .venv, create the embedded encrypted store with a
# demo secret, start a local echo API and credproxy on config/example.yaml, make one
# call through it, then keep the proxy running in the foreground (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || { echo "python3 -m venv failed: on Debian run 'apt-get install python3-venv' first" >&2; exit 1; }
fi
.venv/bin/pip install -q --disable-pip-version-check -e .
CP=.venv/bin/credproxy
CFG=config/example.yaml
if [ ! -f config/secrets.enc ]; then
  $CP secrets init -c "$CFG"
  # A random demo API key, read from stdin (never from argv), stored encrypted.
  .venv/bin/python -c 'import secrets; print("sk_demo_" + secrets.token_hex(12))' | $CP secrets put -c "$CFG" demo/api token
fi
$CP check -c "$CFG"
.venv/bin/python deploy/demo/echo_upstream.py 9999 &
ECHO_PID=$!
$CP serve -c "$CFG" 2> >(grep -v '"level": "debug"' >&2) &
PROXY_PID=$!
trap 'kill $PROXY_PID $ECHO_PID 2>/dev/null; wait 2>/dev/null' EXIT
.venv/bin/python - <<'PY'
import json, time, urllib.request
for _ in range(50):
    try:
        urllib.request.urlopen("http://127.0.0.1:8081/readyz", timeout=1); break
    except Exception:
        time.sleep(0.2)
req = urllib.request.Request("http://127.0.0.1:8080/demo/v1/hello?greeting=hi",
                             headers={"Authorization": "Bearer demo-caller-token"})
with urllib.request.urlopen(req, timeout=5) as resp:
    echoed = json.load(resp)
    print("\n--- a call through credproxy ---")
    print("caller sent:       GET /demo/v1/hello?greeting=hi with its caller token (no API key)")
    print("upstream received: %s %s with the real API key (the echo API's own line above)" % (echoed["method"], echoed["path"]))
    print("caller's copy of the echoed answer: Authorization: %s" % echoed["headers"].get("Authorization"))
    print("  (the echo API sent the key back; credproxy's leak guard redacted it before the caller saw it)")
    print("request id:       %s" % resp.headers["X-Request-Id"])
print("\ncredproxy is serving on 127.0.0.1:8080 (admin 127.0.0.1:8081). Ctrl-C to stop.")
PY
wait $PROXY_PID
