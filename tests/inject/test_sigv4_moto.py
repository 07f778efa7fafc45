"""aws_sigv4 end to end: boto3 with ``signature_version=UNSIGNED`` -> credproxy -> moto.

moto runs as a real server process on loopback. It starts with authentication
off so the IAM user, its access key and an assumable role can be created, then
``/moto-api/reset-auth`` switches SigV4 verification on for every later call:
from then on only correctly signed requests succeed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import aiohttp
import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from proxy.store.secret import Secret
from tests._signing_harness import CALLER, Running, assert_nowhere, json_logs, signing_proxy  # noqa: F401
from tests.helpers import CALLER_TOKENS, free_port

REGION = "us-east-1"


class Moto:
    def __init__(self, url: str, key_id: str, secret: str, temp: dict) -> None:
        self.url, self.key_id, self.secret, self.temp = url, key_id, secret, temp


@pytest.fixture(scope="module")
def moto():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        direct = dict(endpoint_url=url, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
        iam = boto3.client("iam", **direct)
        iam.create_user(UserName="app")
        key = iam.create_access_key(UserName="app")["AccessKey"]
        allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="app", PolicyName="all", PolicyDocument=json.dumps(allow_all))
        trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                                                        "Action": "sts:AssumeRole"}]}
        role = iam.create_role(RoleName="worker", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
        temp = boto3.client("sts", **direct).assume_role(RoleArn=role["Arn"], RoleSessionName="via-credproxy")
        # From here on moto verifies every request's SigV4 signature.
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"})).read()
        yield Moto(url, key["AccessKeyId"], key["SecretAccessKey"], temp["Credentials"])
    finally:
        proc.terminate()
        proc.wait(10)


def aws_credential(moto: Moto, service: str, *, secret_path: str = "aws/app", **extra) -> dict:
    auth = {"type": "aws_sigv4", "access_key_id": f"{secret_path}#access_key_id",
            "secret_access_key": f"{secret_path}#secret_access_key", "region": REGION, "service": service}
    auth.update(extra.pop("auth", {}))
    return {"upstream": moto.url, "allow_insecure_upstream": True, "auth": auth,
            "allow": [{"callers": [CALLER], "paths": ["/**"]}], **extra}


def read_object(s3, bucket: str, key: str) -> bytes:
    # The body is read in the worker thread too: credproxy streams it from this test's event loop.
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def client(running: Running, credential: str, service: str):
    """A boto3 client that signs nothing and presents only its caller token to credproxy."""
    c = boto3.client(service, endpoint_url=f"{running.url}/{credential}", region_name=REGION,
                     config=BotoConfig(signature_version=UNSIGNED, s3={"addressing_style": "path"},
                                       retries={"max_attempts": 1, "mode": "standard"}))

    def add_caller_token(request, **_):
        request.headers["Proxy-Authorization"] = f"Bearer {CALLER_TOKENS[CALLER]}"

    c.meta.events.register("before-send", add_caller_token)
    return c


async def test_sts_and_s3_through_credproxy(moto, signing_proxy, json_logs):
    running = await signing_proxy(
        {"sts": aws_credential(moto, "sts"), "s3": aws_credential(moto, "s3", session={"replay_max_body": "64KiB"})},
        {"aws/app#access_key_id": moto.key_id, "aws/app#secret_access_key": moto.secret},
    )
    sts = client(running, "sts", "sts")
    ident = await asyncio.to_thread(sts.get_caller_identity)
    assert ident["Arn"].endswith(":user/app")

    s3 = client(running, "s3", "s3")
    await asyncio.to_thread(s3.create_bucket, Bucket="reports")
    small = b"quarterly numbers\n" * 10
    await asyncio.to_thread(s3.put_object, Bucket="reports", Key="q1/summary.txt", Body=small)
    assert await asyncio.to_thread(read_object, s3, "reports", "q1/summary.txt") == small

    # Larger than replay_max_body: streamed upstream, signed with UNSIGNED-PAYLOAD.
    big = os.urandom(300 * 1024)
    await asyncio.to_thread(s3.put_object, Bucket="reports", Key="raw/blob.bin", Body=big)
    assert await asyncio.to_thread(read_object, s3, "reports", "raw/blob.bin") == big

    # A key that needs percent-encoding. (moto mis-verifies even boto3's own signatures when the
    # path or query holds escapes such as %3A or %2F, so those are covered in test_sigv4_signer.py.)
    spaced = "q1/final summary.txt"
    await asyncio.to_thread(s3.put_object, Bucket="reports", Key=spaced, Body=b"x")
    listed = await asyncio.to_thread(s3.list_objects_v2, Bucket="reports")
    assert sorted(o["Key"] for o in listed["Contents"]) == [spaced, "q1/summary.txt", "raw/blob.bin"]

    await assert_nowhere(running, moto.secret, json_logs.getvalue())


async def test_session_token_is_signed_and_sent(moto, signing_proxy):
    running = await signing_proxy(
        {"sts": aws_credential(moto, "sts", secret_path="aws/worker",
                               auth={"session_token": "aws/worker#session_token"})},
        {"aws/worker#access_key_id": moto.temp["AccessKeyId"],
         "aws/worker#secret_access_key": moto.temp["SecretAccessKey"],
         "aws/worker#session_token": moto.temp["SessionToken"]},
    )
    ident = await asyncio.to_thread(client(running, "sts", "sts").get_caller_identity)
    assert ":assumed-role/worker/via-credproxy" in ident["Arn"]


async def test_wrong_stored_key_gets_the_upstream_403(moto, signing_proxy, json_logs):
    wrong = "wrong" + moto.secret[5:]
    running = await signing_proxy(
        {"sts": aws_credential(moto, "sts"), "s3": aws_credential(moto, "s3")},
        {"aws/app#access_key_id": moto.key_id, "aws/app#secret_access_key": wrong},
    )
    with pytest.raises(ClientError) as err:
        await asyncio.to_thread(client(running, "sts", "sts").get_caller_identity)
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as err:
        await asyncio.to_thread(client(running, "s3", "s3").list_buckets)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    audit = [(a["credential"], a["status"], a["outcome"]) for a in running.audit()]
    assert audit == [("sts", 403, "allowed"), ("s3", 403, "allowed")]
    await assert_nowhere(running, wrong, json_logs.getvalue())


async def test_rotated_key_is_picked_up_and_the_request_replayed_with_a_new_signature(moto, signing_proxy):
    """The store still holds a retired key when credproxy starts; the operator then writes the
    right one. The upstream's answer matches expired_when, the secret is re-read and the
    request replayed once, signed again with the new key."""
    running = await signing_proxy(
        {"sts": aws_credential(moto, "sts", session={
            "expired_when": [{"status": 403, "body_contains": "InvalidClientTokenId"}]})},
        {"aws/app#access_key_id": "AKIAIOSFODNN7RETIRED", "aws/app#secret_access_key": "retired-secret"},
    )
    sts = client(running, "sts", "sts")
    with pytest.raises(ClientError) as err:  # the retired key is unknown upstream; nothing newer exists yet
        await asyncio.to_thread(sts.get_caller_identity)
    assert err.value.response["Error"]["Code"] == "InvalidClientTokenId"
    running.store.put_sync("aws/app", "access_key_id", Secret(moto.key_id))
    running.store.put_sync("aws/app", "secret_access_key", Secret(moto.secret))
    # The first re-read happened on the failure above; the 30 s limit would hold back the next one.
    running.proxy._cache._entries["aws/app"].reread_at = float("-inf")
    ident = await asyncio.to_thread(sts.get_caller_identity)
    assert ident["Arn"].endswith(":user/app")
    last = running.audit()[-1]
    assert (last["status"], last["token_refreshed"]) == (200, True)


async def test_caller_signature_headers_and_presigned_params_are_replaced(moto, signing_proxy):
    """A caller that sends its own (bogus) SigV4 material: it is removed, not forwarded.
    moto would refuse a request carrying a session token for a long-term key, or a
    presigned-URL signature."""
    running = await signing_proxy(
        {"s3": aws_credential(moto, "s3")},
        {"aws/app#access_key_id": moto.key_id, "aws/app#secret_access_key": moto.secret},
    )
    s3 = client(running, "s3", "s3")
    await asyncio.to_thread(s3.create_bucket, Bucket="inbox")
    await asyncio.to_thread(s3.put_object, Bucket="inbox", Key="note.txt", Body=b"hello")
    bogus = {**running.caller_headers, "X-Amz-Date": "19990101T000000Z",
             "X-Amz-Security-Token": "caller-made-up-token", "X-Amz-Content-SHA256": "0" * 64,
             "Date": "Fri, 01 Jan 1999 00:00:00 GMT"}
    query = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAFAKE%2F19990101%2Fus-east-1%2Fs3%2Faws4_request"
             "&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=" + "0" * 64)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{running.url}/s3/inbox/note.txt?{query}", headers=bogus) as r:
            assert r.status == 200, await r.text()
            assert await r.read() == b"hello"
