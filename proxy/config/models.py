"""The configuration file: pydantic models, loading, and problem reports.

``load(path)`` returns a validated ``Config`` or raises ``ConfigInvalid`` whose
``problems`` each name file, line (where known) and field path. No problem
message ever contains a configured value.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.config.auth import AuthConfig
from proxy.config.fields import Duration, ListenAddr, Listen, Ref, Size

CREDENTIAL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
CALLER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LeakGuardMode = Literal["redact", "block", "off"]
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Model):
    cert_file: str
    key_file: str
    client_ca_file: str | None = None


class Limits(_Model):
    max_header_line: Size = 8192
    max_headers: int = 100
    max_body: Size = 1 << 30
    header_timeout: Duration = 10.0  # slowloris: the whole request head must arrive in this time
    write_timeout: Duration = 60.0  # slow readers: a caller that takes no response bytes this long is cut off
    body_timeout: Duration = Field(default=60.0, gt=0)  # slow uploads: a caller that sends no body bytes this long
    max_connections: int = Field(default=10000, ge=1)  # open caller connections per process (main + dedicated)


class ServerConfig(_Model):
    listen: ListenAddr = Listen.parse("127.0.0.1:8080")
    tls: TLSConfig | None = None
    drain_timeout: Duration = 20.0
    limits: Limits = Limits()
    connect_timeout: Duration = 10.0  # upstream TCP+TLS connect
    read_timeout: Duration = 60.0  # upstream: time to the response head, and between body reads
    deny_private_upstreams: bool = False  # also refuse upstream addresses in private ranges (see proxy.upstream.address_policy)
    deny_upstream_networks: list[IPNet] = Field(default_factory=list)  # further ranges never connected to


class AdminConfig(_Model):
    listen: ListenAddr = Listen.parse("127.0.0.1:8081")
    token_file: str | None = None


class FileStoreConfig(_Model):
    path: str = "config/secrets.enc"
    key_file: str | None = "config/master.key"


class VaultAuthConfig(_Model):
    method: Literal["token", "approle", "kubernetes"] = "token"
    token_file: str | None = None
    role_id_file: str | None = None
    secret_id_file: str | None = None
    mount: str | None = None  # auth mount path; defaults to the method name
    role: str | None = None
    jwt_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"

    @model_validator(mode="after")
    def _method_fields(self) -> "VaultAuthConfig":
        needs = {"approle": ("role_id_file", "secret_id_file"), "kubernetes": ("role",)}.get(self.method, ())
        missing = [f for f in needs if not getattr(self, f)]
        if missing:
            raise ValueError(f"auth method {self.method} needs {' and '.join(missing)}")
        return self


class VaultConfig(_Model):
    address: str
    kv_mount: str = "secret"
    namespace: str | None = None
    ca_file: str | None = None
    auth: VaultAuthConfig = VaultAuthConfig()
    timeout: Duration = 5.0
    refresh_interval: Duration = 60.0
    max_staleness: Duration = 3600.0


class SecretsConfig(_Model):
    backend: Literal["file", "vault"] = "file"
    file: FileStoreConfig = FileStoreConfig()
    vault: VaultConfig | None = None


class ClusterConfig(_Model):
    """Replicas sharing minted tokens (SPEC §9); see proxy.tokens.cluster."""

    backend: Literal["none", "vault"] = "none"
    path: str = "credproxy/cluster"  # under secrets.vault.kv_mount
    lease_timeout: Duration = Field(default=10.0, gt=0)  # a refresher that died holds the others up at most this long


class AuditConfig(_Model):
    """SPEC §8, §11; see proxy.observe.audit."""

    path: str = "audit.log"  # or "-": stdout
    flush_interval: Duration = Field(default=1.0, gt=0, le=60)  # buffered lines are written at least this often
    on_failure: Literal["refuse", "continue"] = "refuse"  # while lines cannot be written: refuse requests, or serve
    max_buffered_lines: int = Field(default=100_000, ge=1)  # held while writes fail; past it lines are dropped


class RateLimit(_Model):
    """A token bucket: ``rps`` requests per second on average, bursts of up to ``burst``."""

    rps: float = Field(gt=0)
    burst: int | None = Field(default=None, ge=1)  # default: rps rounded up


class AlertsConfig(_Model):
    multi_ip_window: Duration = 300.0  # one caller from a second source address within this window
    denied_threshold: int = Field(default=10, ge=1)  # this many denied requests ...
    denied_window: Duration = 60.0  # ... within this window, from one caller or address
    webhook_url: str | None = None  # optional: each alert is POSTed here as JSON, off the request path
    webhook_timeout: Duration = 5.0


class CallerConfig(_Model):
    token_sha256: str | None = None
    allow_ips: list[IPNet] | None = None
    cert_subject: str | None = None
    rate_limit: RateLimit | None = None

    @field_validator("token_sha256")
    @classmethod
    def _hex64(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("must be the 64-hex-digit SHA-256 of the caller token (see: credproxy callers new)")
        return v.lower() if v else v

    @field_validator("cert_subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        if v is not None:
            from proxy.callers import parse_subject  # callers builds on this module

            if not parse_subject(v):
                raise ValueError("cert_subject must be ATTR=value pairs such as CN=billing,O=acme")
        return v


class ExpiredWhen(_Model):
    status: int = Field(ge=100, le=599)
    body_contains: str | None = None


class SessionConfig(_Model):
    ttl: Duration = 3600.0
    refresh_before: Duration = 300.0
    expired_when: list[ExpiredWhen] = Field(default_factory=lambda: [ExpiredWhen(status=401)])
    prefetch: bool = False
    replay_max_body: Size = 1 << 20
    revoke_on_shutdown: bool = False


class AllowRule(_Model):
    callers: list[str] | None = None  # None: any caller (anonymous sidecars included)
    methods: list[str] = Field(default_factory=lambda: ["*"])
    paths: list[str] = Field(min_length=1)
    source_ips: list[IPNet] | None = None

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        out = [m.upper() for m in v]
        for m in out:
            if m != "*" and not re.fullmatch(r"[A-Z]+", m):
                raise ValueError("methods are HTTP method names or *")
        return out

    @field_validator("paths")
    @classmethod
    def _rooted(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/"):
                raise ValueError("paths must start with /")
        return v


class UpstreamTLSConfig(_Model):
    ca_file: str | None = None
    client_cert: Ref | None = None  # PEM certificate (chain), presented to the upstream (mTLS)
    client_key: Ref | None = None  # PEM private key (unencrypted) for client_cert

    @model_validator(mode="after")
    def _cert_with_key(self) -> "UpstreamTLSConfig":
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key are set together")
        return self


class ProbeConfig(_Model):
    method: str = "GET"
    path: str = "/"
    expect_status: int = Field(200, ge=100, le=599)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z]+", v):
            raise ValueError("must be an HTTP method name")
        return v.upper()

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with / (upstream-relative, may carry a query)")
        return v


class CredentialConfig(_Model):
    upstream: str
    listen: ListenAddr | None = None
    tls: TLSConfig | None = None
    auth: AuthConfig
    session: SessionConfig = SessionConfig()
    allow: list[AllowRule] = Field(default_factory=list)
    leak_guard: LeakGuardMode | None = None
    allow_insecure_upstream: bool = False
    upstream_tls: UpstreamTLSConfig | None = None
    probe: ProbeConfig | None = None
    rate_limit: RateLimit | None = None
    hosts: list[str] = Field(default_factory=list)  # forward proxy (SPEC §10): "host" (port 443) or "host:port"


class ForwardCAConfig(_Model):
    cert_file: str  # public: callers trust it
    key: Ref  # the CA's private key (PEM) in the secret store; never on disk in the clear


class ForwardProxyConfig(_Model):
    """SPEC §10: a listener for clients that honour HTTPS_PROXY (see proxy.server.forward)."""

    listen: ListenAddr
    ca: ForwardCAConfig
    tunnel_hosts: list[str] = Field(default_factory=list)  # "host:port", relayed opaquely


class Config(_Model):
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    secrets: SecretsConfig = SecretsConfig()
    audit: AuditConfig = AuditConfig()
    callers: dict[str, CallerConfig] | None = None
    credentials: dict[str, CredentialConfig] = Field(default_factory=dict)
    leak_guard: LeakGuardMode = "redact"
    alerts: AlertsConfig = AlertsConfig()
    cluster: ClusterConfig = ClusterConfig()
    forward_proxy: ForwardProxyConfig | None = None

    def leak_guard_for(self, name: str) -> str:
        return self.credentials[name].leak_guard or self.leak_guard


# --- problems -----------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '<root>'}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "path": self.path, "message": self.message}


class ConfigInvalid(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(f"{len(problems)} configuration problem(s)")
        self.problems = problems


def _line_index(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML document to its 1-based line."""
    index: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                index[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return index


def _line_for(index: dict[tuple, int], loc: tuple) -> int | None:
    loc = tuple(loc)
    while loc:
        if loc in index:
            return index[loc]
        loc = loc[:-1]
    return None


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _url_problems(url: str, insecure_ok: bool) -> list[str]:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return ["is not a valid URL"]
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return ["must be an absolute https:// URL"]
    out = []
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        out.append("must not contain userinfo (user:password@)")
    if parts.scheme == "http" and not insecure_ok:
        out.append("http:// is refused unless the credential sets allow_insecure_upstream: true")
    if parts.query or parts.fragment:
        out.append("must not contain a query or fragment")
    return out


def semantic_problems(cfg: Config) -> list[tuple[tuple, str]]:
    """Cross-field checks the schema cannot express. Returns (loc, message)."""
    out: list[tuple[tuple, str]] = []
    callers = cfg.callers or {}
    token_owner: dict[str, str] = {}
    for name, caller in callers.items():
        if caller.token_sha256:
            other = token_owner.setdefault(caller.token_sha256.lower(), name)
            if other != name:  # the token could not say which caller is calling
                out.append((("callers", name, "token_sha256"), f"the same token as caller {other}"))
        if not CALLER_NAME.match(name):
            out.append((("callers", name), "caller names are letters, digits, '_', '-', '.' (at most 64)"))
        if not caller.token_sha256 and not caller.cert_subject:
            out.append((("callers", name), "a caller needs token_sha256 or cert_subject"))
        if caller.cert_subject and not (cfg.server.tls and cfg.server.tls.client_ca_file):
            out.append((("callers", name, "cert_subject"), "needs server.tls.client_ca_file"))
    listeners: dict[str, tuple] = {}

    def claim(listen: Listen, loc: tuple) -> None:
        key = str(listen)
        if listen.port == 0:  # an ephemeral port never collides
            return
        if key in listeners:
            out.append((loc, f"listener already used by {_dotted(listeners[key])}"))
        else:
            listeners[key] = loc

    claim(cfg.server.listen, ("server", "listen"))
    claim(cfg.admin.listen, ("admin", "listen"))
    all_loopback = cfg.server.listen.is_loopback
    for name, cred in cfg.credentials.items():
        base = ("credentials", name)
        if not CREDENTIAL_NAME.match(name):
            out.append((base, "credential names must match ^[a-z0-9][a-z0-9_-]{0,63}$"))
        for msg in _url_problems(cred.upstream, cred.allow_insecure_upstream):
            out.append((base + ("upstream",), msg))
        for field in ("token_url", "revocation_url"):
            url = getattr(cred.auth, field, None)
            if url:
                for msg in _url_problems(url, cred.allow_insecure_upstream):
                    out.append((base + ("auth", field), msg))
        login = getattr(cred.auth, "login", None)
        if login is not None and getattr(login, "url", None):
            for msg in _url_problems(login.url, cred.allow_insecure_upstream):
                out.append((base + ("auth", "login", "url"), msg))
        if cred.listen is not None:
            claim(cred.listen, base + ("listen",))
            all_loopback = all_loopback and cred.listen.is_loopback
        if cred.tls is not None and cred.listen is None:
            out.append((base + ("tls",), "tls applies to a dedicated listener: set listen as well"))
        for i, rule in enumerate(cred.allow):
            for c in rule.callers or []:
                if c != "*" and c not in callers:
                    out.append((base + ("allow", i, "callers"), "names a caller that is not defined under callers"))
        for caller_name in getattr(cred.auth, "per_caller_subject", {}):
            if caller_name not in callers:
                out.append((base + ("auth", "per_caller_subject", caller_name),
                            "names a caller that is not defined under callers"))
        own_fields = cred.auth.overridable_fields()
        for caller_name, overrides in cred.auth.per_caller.items():
            if caller_name not in callers:
                out.append((base + ("auth", "per_caller", caller_name), "names a caller that is not defined under callers"))
            for field in overrides:
                if field not in own_fields:
                    out.append((base + ("auth", "per_caller", caller_name, field), "is not a secret field of this auth type"))
    if cfg.forward_proxy is not None:
        claim(cfg.forward_proxy.listen, ("forward_proxy", "listen"))
        all_loopback = all_loopback and cfg.forward_proxy.listen.is_loopback
    out += _forward_problems(cfg)
    if cfg.callers is None and not all_loopback:
        out.append((("callers",), "callers may be omitted only when every listener is loopback or a unix socket"))
    if cfg.secrets.backend == "vault" and cfg.secrets.vault is None:
        out.append((("secrets", "vault"), "backend vault needs a secrets.vault section"))
    if cfg.secrets.vault is not None:
        for msg in _url_problems(cfg.secrets.vault.address, True):
            out.append((("secrets", "vault", "address"), msg))
    if cfg.cluster.backend == "vault" and cfg.secrets.backend != "vault":
        out.append((("cluster", "backend"), "cluster backend vault needs secrets.backend: vault"))
    if not cfg.cluster.path.strip("/") or ".." in cfg.cluster.path.split("/"):
        out.append((("cluster", "path"), "must be a path under the KV mount"))
    if cfg.alerts.webhook_url is not None:
        for msg in _url_problems(cfg.alerts.webhook_url, True):
            out.append((("alerts", "webhook_url"), msg))
    return out


def _forward_problems(cfg: Config) -> list[tuple[tuple, str]]:
    from proxy.server.forward.hosts import parse_host  # hosts builds on this module

    out: list[tuple[tuple, str]] = []
    tunnels: set[tuple[str, int]] = set()
    if cfg.forward_proxy is not None:
        if cfg.forward_proxy.listen.unix:
            out.append((("forward_proxy", "listen"), "must be host:port (clients reach proxies over TCP)"))
        for i, entry in enumerate(cfg.forward_proxy.tunnel_hosts):
            loc = ("forward_proxy", "tunnel_hosts", i)
            try:
                hp = parse_host(entry, default_port=None)
            except ValueError as exc:
                out.append((loc, str(exc)))
                continue
            if hp in tunnels:
                out.append((loc, "listed twice"))
            tunnels.add(hp)
    for name, cred in cfg.credentials.items():
        seen: set[tuple[str, int]] = set()
        for i, entry in enumerate(cred.hosts):
            loc = ("credentials", name, "hosts", i)
            try:
                hp = parse_host(entry, default_port=443)
            except ValueError as exc:
                out.append((loc, str(exc)))
                continue
            if hp in seen:
                out.append((loc, "listed twice for this credential"))
            seen.add(hp)
            if hp in tunnels:
                out.append((loc, "also in forward_proxy.tunnel_hosts: a host is either intercepted or tunnelled"))
        if cred.hosts and cfg.forward_proxy is None:
            out.append((("credentials", name, "hosts"), "hosts needs a forward_proxy section"))
    return out


def _without_input(err: dict) -> str:
    """pydantic's message, minus any echo of the offending value (a tag error quotes it)."""
    if err["type"] == "union_tag_invalid":
        return f"must be one of {err['ctx']['expected_tags']}"
    msg, value = err["msg"], err.get("input")
    if isinstance(value, str) and value and value in msg:
        msg = msg.replace(value, "…")
    return msg


def parse(text: str, filename: str = "<config>") -> Config:
    index = _line_index(text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ConfigInvalid([Problem(filename, line, "", "is not valid YAML")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigInvalid([Problem(filename, 1, "", "the top level must be a mapping")])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
            if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc += ("type",)
            problems.append(Problem(filename, _line_for(index, loc), _dotted(loc), _without_input(err)))
        raise ConfigInvalid(problems) from None
    problems = [Problem(filename, _line_for(index, loc), _dotted(loc), msg) for loc, msg in semantic_problems(cfg)]
    if problems:
        raise ConfigInvalid(problems)
    return cfg


# pydantic puts the union member's tag in the error location; drop it from paths.
_UNION_TAGS = {"header", "query", "basic", "oauth2_client_credentials", "oauth2_refresh_token",
               "oauth2_jwt_bearer", "session_login", "aws_sigv4", "hmac"}


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigInvalid([Problem(str(p), None, "", f"cannot be read ({exc.strerror or 'error'})")]) from None
    return parse(text, str(p))


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "credproxy configuration"
    return schema
