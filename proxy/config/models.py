"""The configuration file: pydantic models, loading, and problem reports.

``load(path)`` returns a validated ``Config`` or raises ``ConfigInvalid`` whose
``problems`` each name file, line (where known) and field path. No problem
message ever contains a configured value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from proxy.config import schema_problems
from proxy.config.auth import AuthConfig
from proxy.config.fields import FROM_FILE, CertSubject, Duration, ListenAddr, Listen, Network, Ref, Size
from proxy.errors import ConfigInvalid
from proxy.host_map import parse_host

CREDENTIAL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
CALLER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LeakGuardMode = Literal["redact", "block", "off"]


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
    deny_upstream_networks: list[Network] = Field(default_factory=list)  # further ranges never connected to


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
    max_buffered_lines: int = Field(default=50_000, ge=1)  # held while writes fail; past it lines are dropped


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
    allow_ips: list[Network] | None = None
    cert_subject: CertSubject | None = None
    rate_limit: RateLimit | None = None

    @field_validator("token_sha256")
    @classmethod
    def _hex64(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("must be the 64-hex-digit SHA-256 of the caller token (see: credproxy callers new)")
        return v.lower() if v else v


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
    source_ips: list[Network] | None = None

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


def _read_yaml(text: str, filename: str) -> tuple[Any, dict[tuple, int]]:
    """The document, read once: composed into nodes (which know their lines), then built from that node."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigInvalid([Problem(filename, mark.line + 1 if mark else None, "", "is not valid YAML")]) from None
    finally:
        loader.dispose()
    return data, _line_index(root)


def _line_index(root: yaml.Node | None) -> dict[tuple, int]:
    """Map each key path in the document to its 1-based line."""
    index: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                index[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
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


def dotted(loc: tuple) -> str:
    """``("credentials", "x", "allow", 0)`` -> ``credentials.x.allow[0]``."""
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


def semantic_problems(cfg: Config, declared_callers=None) -> list[tuple[tuple, str]]:
    """Cross-field checks the schema cannot express. Returns (loc, message). ``declared_callers``: the names a
    reference may use (default: the config's callers)."""
    out: list[tuple[tuple, str]] = []
    callers = cfg.callers or {}
    declared = callers if declared_callers is None else declared_callers
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
            out.append((loc, f"listener already used by {dotted(listeners[key])}"))
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
                if c != "*" and c not in declared:
                    out.append((base + ("allow", i, "callers"), "names a caller that is not defined under callers"))
        for caller_name in getattr(cred.auth, "per_caller_subject", {}):
            if caller_name not in declared:
                out.append((base + ("auth", "per_caller_subject", caller_name),
                            "names a caller that is not defined under callers"))
        own_fields = cred.auth.overridable_fields()
        for caller_name, overrides in cred.auth.per_caller.items():
            if caller_name not in declared:
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


@dataclass(frozen=True)
class Examined:
    """A config file read and checked: what validates of it, and every problem found."""

    filename: str
    cfg: Config  # with what the problems are about set aside: for the checks that need a valid config
    problems: list[Problem]
    lines: dict[tuple, int]
    set_aside: tuple[tuple, ...]  # the paths the problems are about (with stand-ins for required keys)

    def problem(self, loc: tuple, message: str) -> Problem:
        return Problem(self.filename, _line_for(self.lines, loc), dotted(loc), message)

    def as_written(self, loc: tuple) -> bool:
        """Whether ``cfg`` holds the file's own value at ``loc`` (nothing at or around it was set aside)."""
        return not any(schema_problems.related(loc, gone) for gone in self.set_aside)


def examine(text: str, filename: str = "<config>") -> Examined:
    """Every problem of a config file: the schema's, and the checks that need a valid config, run over what
    is left once the schema's problems are set aside. Raises ``ConfigInvalid`` only when the file is not a
    YAML mapping at all."""
    data, index = _read_yaml(text, filename)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigInvalid([Problem(filename, 1, "", "the top level must be a mapping")])
    found: list[tuple[tuple, str]] = []
    removed: list[tuple] = []
    remaining = data
    for _ in range(64):  # each round sets at least one key aside, and the root validates once empty
        try:
            cfg = Config.model_validate(remaining, context=FROM_FILE)
            break
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            if not removed:
                found = schema_problems.explain(Config, errors)  # later rounds only see what removal caused
            remaining, gone = schema_problems.without(remaining, Config, errors, _STAND_INS)
            removed += gone
    else:  # pragma: no cover - removal always ends in a valid (at worst empty) document
        cfg, removed = Config(), [()]
    for loc, msg in semantic_problems(cfg, declared_callers=_declared(data.get("callers"))):
        if not any(schema_problems.related(loc, gone) for gone in removed):
            found.append((loc, msg))
    found = _note_denies_everything(found, data)
    problems = [Problem(filename, _line_for(index, loc), dotted(loc), msg) for loc, msg in found]
    return Examined(filename, cfg, sorted(problems, key=lambda p: p.line or 0), index, tuple(removed))


def parse(text: str, filename: str = "<config>") -> Config:
    """A validated ``Config``, or ``ConfigInvalid`` with every problem ``examine`` finds."""
    examined = examine(text, filename)
    if examined.problems:
        raise ConfigInvalid(examined.problems)
    return examined.cfg


# Valid values for required keys that are missing or wrong, so the rest of their section is still checked
# (problems at a stand-in itself are not reported: it is set aside like a removed key).
_STAND_INS = {"upstream": "https://stand-in.invalid", "paths": ["/"],
              "auth": {"type": "header", "secret": "stand-in#value"}}


class _Everyone:
    def __contains__(self, name: object) -> bool:
        return True


def _declared(callers: Any):
    """Caller names the file declares, valid or not (a reference to a broken caller is not a second problem)."""
    if callers is None:
        return set()
    return set(callers) if isinstance(callers, dict) else _Everyone()


def _note_denies_everything(found: list[tuple[tuple, str]], data: dict) -> list[tuple[tuple, str]]:
    """A misspelt or misplaced ``allow`` leaves its credential with no rule: say that it would deny everything."""
    creds = data.get("credentials") if isinstance(data.get("credentials"), dict) else {}
    out = []
    for loc, msg in found:
        raw = creds.get(loc[1]) if len(loc) > 2 and loc[0] == "credentials" else None
        if (isinstance(raw, dict) and not (isinstance(raw.get("allow"), list) and raw["allow"])
                and schema_problems.misplaced(loc, msg, "allow")):
            msg += f" (as written, credential {loc[1]} has no allow rules and denies every request)"
        out.append((loc, msg))
    return out


def read(path: str | Path) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigInvalid([Problem(str(p), None, "", f"cannot be read ({exc.strerror or 'error'})")]) from None


def load(path: str | Path) -> Config:
    return parse(read(path), str(path))


class _AsWritten(GenerateJsonSchema):
    """Defaults as a config file would say them (``"20s"``, ``"127.0.0.1:8080"``, ``"Bearer {secret}"``),
    through each field's own serializer, not as the objects they become (``{"host": ..., "port": ...}``)."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        out = super().default_schema(schema)
        ser = schema["schema"].get("serialization") or {}
        if "default" in out and ser.get("type") == "function-plain":
            out["default"] = ser["function"](self.get_default_value(schema))
        return out


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(mode="validation", schema_generator=_AsWritten)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "credproxy configuration"
    return schema
