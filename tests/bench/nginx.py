"""Debian's nginx as the upstream (static JSON and files) and as a header-injecting
reverse proxy, each one unprivileged single process with a generated config."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SMALL_JSON = ('{"id":"cus_9fQa2LxW","object":"customer","email":"jenny.rosen@example.com","name":"Jenny Rosen",'
              '"balance":0,"currency":"eur","delinquent":false,"metadata":{"order_id":"6735"},'
              '"created":1700000000,"livemode":false}')

_COMMON = """
worker_processes 1;
master_process off;
daemon off;
pid {dir}/{name}.pid;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  default_type application/octet-stream;
  sendfile on;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  client_body_temp_path {dir}/{name}-body;
  proxy_temp_path {dir}/{name}-proxy;
  fastcgi_temp_path {dir}/{name}-fcgi;
  uwsgi_temp_path {dir}/{name}-uwsgi;
  scgi_temp_path {dir}/{name}-scgi;
{body}
}}
"""

UPSTREAM = """
  server {{
    listen 127.0.0.1:{port} backlog=8192;
    location = /v1/small {{ default_type application/json; return 200 '{small}'; }}
    location /v1/files/ {{ root {www}; }}
  }}
"""

PROXY = """
  upstream origin {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port} backlog=8192;
    location /bench/ {{
      proxy_pass http://origin/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer bench-upstream-key";
      proxy_max_temp_file_size 0;
    }}
  }}
"""


def nginx_binary() -> str:
    path = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(path):
        raise SystemExit("nginx not found: apt-get install -y nginx wrk")
    return path


def write_config(workdir: Path, name: str, body: str) -> Path:
    for sub in ("body", "proxy", "fcgi", "uwsgi", "scgi"):
        (workdir / f"{name}-{sub}").mkdir(exist_ok=True)
    conf = workdir / f"{name}.conf"
    conf.write_text(_COMMON.format(dir=workdir, name=name, body=body))
    return conf


def upstream_config(workdir: Path, port: int, www: Path) -> Path:
    return write_config(workdir, "upstream", UPSTREAM.format(port=port, www=www, small=SMALL_JSON))


def proxy_config(workdir: Path, port: int, upstream_port: int) -> Path:
    return write_config(workdir, "nginxproxy", PROXY.format(port=port, upstream_port=upstream_port))


def command(conf: Path, workdir: Path) -> list[str]:
    return [nginx_binary(), "-p", str(workdir), "-c", str(conf), "-e", str(workdir / f"{conf.stem}.err")]
