import logging

import pytest
from aiohttp.test_utils import TestServer

from tests.helpers import Recorder, base_config, start_proxy, write_store

SECRET = "sk_live_CANARY_b7e1f0c93d2a"


@pytest.fixture
async def upstream():
    rec = Recorder()
    server = TestServer(rec.app(), host="127.0.0.1")
    await server.start_server(auto_decompress=False)  # record bodies exactly as they arrived
    rec.url = str(server.make_url("")).rstrip("/")
    yield rec
    await server.close()


@pytest.fixture
def store_secrets():
    return {"apis/example#token": SECRET}


@pytest.fixture
async def proxy_factory(tmp_path):
    running = []

    async def make(cfg_dict, secrets=None):
        if not (tmp_path / "secrets.enc").exists():
            write_store(tmp_path, secrets if secrets is not None else {"apis/example#token": SECRET})
        p = await start_proxy(cfg_dict)
        running.append(p)
        return p

    yield make
    for p in running:
        await p.proxy.stop()


@pytest.fixture
async def proxy(proxy_factory, upstream, tmp_path):
    return await proxy_factory(base_config(tmp_path, upstream.url))


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog
