"""``credproxy status|refresh|revoke|disable|enable|probe|reload``: thin clients of the admin API.

They read ``admin.listen`` and ``admin.token_file`` from the config file (TCP or
unix socket). People get short tables and sentences; ``--json`` prints the
admin API's answer as is, for scripts. Exit codes: 0 done, 1 the proxy said no
(unknown credential, failed refresh or probe, rejected reload), 2 the config or
token file cannot be used, 3 the proxy is not answering, 4 wrong or missing
admin token. Nothing here ever sees a secret: the admin API never returns one.
"""

from __future__ import annotations

import json
import sys
import time

from proxy.cli.admin_api import AdminClient
from proxy.errors import AdminClientError

ACTIONS = {
    "refresh": ("obtain fresh material for a credential now (re-read secrets, fetch a new token)", "refreshed"),
    "revoke": ("drop a credential's cached token (and revoke it at the provider where supported)", "revoked"),
    "disable": ("kill switch: callers get 503 for this credential until it is enabled", "disabled"),
    "enable": ("undo disable", "enabled"),
    "probe": ("obtain the credential's token and make its probe call upstream; report the outcome", None),
}


def add_admin_commands(sub) -> None:
    p = sub.add_parser("status", help="readiness and the state of every credential")
    _common(p, "status")
    for action, (text, _) in ACTIONS.items():
        p = sub.add_parser(action, help=text)
        p.add_argument("name", metavar="NAME", help="credential name")
        _common(p, action)
    p = sub.add_parser("reload", help="reload the config file now (as SIGHUP does)")
    _common(p, "reload")


def _common(p, action: str) -> None:
    p.add_argument("-c", "--config", required=True, help="the proxy's config file (admin.listen, admin.token_file)")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON answer")
    p.set_defaults(fn=run, admin_action=action)


def run(args) -> int:
    try:
        client = AdminClient.from_config(args.config)
        if args.admin_action == "status":
            return _status(client, args.json)
        if args.admin_action == "reload":
            return _reload(client, args.json)
        if args.admin_action == "probe":
            return _probe(client, args.name, args.json)
        return _action(client, args.admin_action, args.name, args.json)
    except AdminClientError as exc:
        if args.json:
            _print_json({"error": exc.code, "message": str(exc)})
        else:
            print(f"credproxy: {exc}", file=sys.stderr)
        return exc.exit_code


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _refused(status: int, body: dict, name: str | None, as_json: bool) -> int:
    if as_json:
        _print_json(body)
    elif status == 404 and name is not None:
        print(f"credproxy: no credential named {name!r} in the running config", file=sys.stderr)
    else:
        print(f"credproxy: the proxy answered {status} {body.get('error', '')}: {body.get('message', '')}".rstrip(": "),
              file=sys.stderr)
    return 1


# --- status ------------------------------------------------------------------------


def _ago(ts: float | None, now: float) -> str:
    return "-" if ts is None else _span(max(0.0, now - ts)) + " ago"


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _status(client: AdminClient, as_json: bool) -> int:
    _, ready = client.call("GET", "/readyz")
    status, body = client.call("GET", "/v1/credentials")
    if status != 200:
        return _refused(status, body, None, as_json)
    not_ready = 0 if ready.get("ready") else 1  # scripts and probes can act on the exit code alone
    if as_json:
        _print_json({"ready": ready.get("ready"), "waiting": ready.get("waiting", []), **body})
        return not_ready
    now = time.time()
    if ready.get("ready"):
        print(f"credproxy on {client.listen}: ready")
    else:
        print(f"credproxy on {client.listen}: NOT ready (waiting for: {', '.join(ready.get('waiting') or ['?'])})")
    rows = [[c["name"], c["state"], c["auth_type"], _span(c.get("expires_in_s")), _ago(c.get("last_refresh"), now),
             _ago(c.get("last_used"), now), str(c.get("requests", 0)), c.get("last_error") or "-"]
            for c in body["credentials"]]
    if rows:
        print(table(["NAME", "STATE", "AUTH", "EXPIRES IN", "LAST REFRESH", "LAST USED", "REQUESTS", "LAST ERROR"],
                    rows))
    else:
        print("no credentials configured")
    return not_ready


# --- one credential ----------------------------------------------------------------


def _action(client: AdminClient, action: str, name: str, as_json: bool) -> int:
    status, body = client.call("POST", f"/v1/credentials/{_quote(name)}/{action}")
    if status == 404:
        return _refused(status, body, name, as_json)
    if as_json:
        _print_json(body)
        return 0 if status == 200 else 1
    if status != 200:
        print(f"credproxy: {action} {name} failed: {body.get('message', status)} ({body.get('error', '')})",
              file=sys.stderr)
        return 1
    done = ACTIONS[action][1]
    note = "" if body.get("changed", True) else " (it already was)"
    print(f"{name}: {done}{note}; state now {body['credential']['state']}")
    return 0


def _probe(client: AdminClient, name: str, as_json: bool) -> int:
    status, body = client.call("POST", f"/v1/credentials/{_quote(name)}/probe")
    if status != 200:
        return _refused(status, body, name, as_json)
    if as_json:
        _print_json(body)
        return 0 if body.get("ok") else 1
    token = body.get("token") or {}
    head = "ok" if body["ok"] else "FAILED"
    if body.get("error"):
        err = body["error"]
        head += f" at the {err['stage']} step: {err['message']} ({err['code']})"
    print(f"probe {name}: {head}" + (" [credential is disabled for callers]" if body.get("disabled") else ""))
    if token:
        expires = f", expires in {_span(token['expires_in_s'])}" if token.get("expires_in_s") is not None else ""
        print(f"  token: {token.get('state')}{expires} (obtained in {token.get('obtain_ms')} ms)")
    call = body.get("call")
    if call:
        print(f"  call:  {call['method']} {call['path']} -> {call['status']} (expected {call['expect_status']}) "
              f"in {call['latency_ms']} ms")
    elif body["ok"]:
        print("  call:  none (the credential sets no probe: {method, path, expect_status})")
    print(f"  audit request_id: {body.get('request_id')}")
    return 0 if body["ok"] else 1


# --- reload ------------------------------------------------------------------------


def _reload(client: AdminClient, as_json: bool) -> int:
    status, body = client.call("POST", "/v1/reload")
    if as_json:
        _print_json(body)
        return 0 if status == 200 else 1
    if status == 422:
        print("reload rejected; the running config stays. Problems:", file=sys.stderr)
        for p in body.get("problems", []):
            where = f"{p['file']}:{p['line']}" if p.get("line") else p.get("file", "")
            print(f"  {where}: {p.get('path') or '<root>'}: {p['message']}", file=sys.stderr)
        return 1
    if status != 200:
        return _refused(status, body, None, as_json)
    if body.get("changed", True):
        print("reload: applied")
        _print_changes(body)
    else:
        last = body.get("last_change") or {}
        if last.get("trigger") == "start":
            print(f"reload: nothing to apply: the running config is the one the proxy started with at {last['at']}")
        elif last:
            print(f"reload: nothing to apply: {last['by']} already applied this config at {last['at']}")
            _print_changes(last)
        else:
            print("reload: nothing to apply: the running config already matches the file")
    for item in body.get("restart_required", []):
        print(f"  needs a restart to take effect: {item}")
    return 0


def _print_changes(body: dict) -> None:
    creds = body.get("credentials", {})
    for label, key in (("added", "added"), ("removed", "removed"), ("updated", "updated"),
                       ("token cache reset", "sessions_reset")):
        if creds.get(key):
            print(f"  {label}: {', '.join(creds[key])}")
    for label, key in (("listener started", "started"), ("listener stopped", "stopped")):
        for item in body.get("listeners", {}).get(key, []):
            print(f"  {label}: {item}")
    if body.get("settings"):
        print(f"  settings: {', '.join(body['settings'])}")
    if body.get("admin_token_replaced"):
        print("  admin token replaced")


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")
