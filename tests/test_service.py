"""The service's API against the real app, in process, with a real engine and local image server."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from crawler import samples
from crawler.guard import AddressPolicy
from crawler.pipeline import Engine
from crawler.service.api import make_app
from crawler.service.jobs import Jobs
from crawler.service.metrics import Metrics
from crawler.service.openapi import spec
from tests.conftest import make_settings
from tests.server import LocalServer

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Service:
    def __init__(self, client: TestClient[Any, Any], jobs: Jobs, root: Path) -> None:
        self.client = client
        self.jobs = jobs
        self.root = root

    async def call(self, method: str, path: str, **kwargs: Any) -> ClientResponse:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def wait(self, job_id: str, states: tuple[str, ...] = ("done",)) -> dict[str, Any]:
        for _ in range(400):
            body: dict[str, Any] = await (await self.call("GET", f"/v1/jobs/{job_id}")).json()
            if body["state"] in states:
                return body
            await asyncio.sleep(0.025)
        raise AssertionError(f"job {job_id} still {body['state']}")


@asynccontextmanager
async def running_service(
    executor: ProcessPoolExecutor, tmp_path: Path, allow: list[str]
) -> AsyncIterator[Service]:
    settings = make_settings(
        tmp_path,
        service={"max_urls_per_job": 50, "max_body_bytes": 4096, "max_queued_jobs": 3,
                 "min_free_bytes": 0, "allow_ranges": allow, "allowed_ports": []},
    )  # fmt: skip
    policy = AddressPolicy(allow=tuple(allow), ports=())
    async with Engine(settings, executor, policy) as engine:
        jobs = Jobs(tmp_path, settings, engine)
        await jobs.start()
        runner = asyncio.create_task(jobs.run())
        client = TestClient(TestServer(make_app(jobs, Metrics(jobs, engine), TOKEN)))
        await client.start_server()
        try:
            yield Service(client, jobs, tmp_path)
        finally:
            await client.close()
            await jobs.stop(1.0)
            runner.cancel()


@pytest.fixture
async def service(executor: ProcessPoolExecutor, tmp_path: Path) -> AsyncIterator[Service]:
    async with running_service(executor, tmp_path, ["127.0.0.0/8"]) as svc:
        yield svc


async def error_of(response: ClientResponse) -> tuple[int, str]:
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return response.status, body["error"]["code"]


async def test_submit_run_and_read_back(service: Service, server: LocalServer) -> None:
    photo = samples.photo_jpeg(320, 240, seed=3)
    urls = [server.add("a.jpg", photo, "image/jpeg"), server.url("/status/404")]
    response = await service.call(
        "POST", "/v1/jobs", json={"urls": urls, "options": {"thumb_sizes": [64]}}
    )
    assert response.status == 202
    job = await response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    done = await service.wait(job["id"])
    assert done["by_status"] == {"ok": 1, "failed": 1} and done["by_error"] == {"http_404": 1}
    assert done["done"] == 2 and done["rate"] > 0

    lines = (await (await service.call("GET", f"/v1/jobs/{job['id']}/records")).text()).splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["url"] for r in records] == urls
    ok = (
        await (await service.call("GET", f"/v1/jobs/{job['id']}/records?status=ok")).text()
    ).splitlines()
    assert len(ok) == 1

    sha = hashlib.sha256(photo).hexdigest()
    original = await service.call("GET", f"/v1/images/{sha}")
    assert original.status == 200 and original.headers["Content-Type"] == "image/jpeg"
    assert original.headers["ETag"] == f'"{sha}"' and await original.read() == photo
    cached = await service.call("GET", f"/v1/images/{sha}", headers={"If-None-Match": f'"{sha}"'})
    assert cached.status == 304
    thumb = await service.call("GET", f"/v1/images/{sha}/thumbnail?size=64")
    assert thumb.status == 200 and thumb.headers["Content-Type"] == "image/jpeg"
    assert await error_of(await service.call("GET", f"/v1/images/{'0' * 64}")) == (
        404,
        "no_such_image",
    )


async def test_plain_text_submission_and_idempotency(service: Service, server: LocalServer) -> None:
    url = server.add("a.gif", samples.gif_palette())
    headers = {"Content-Type": "text/plain", "Idempotency-Key": "k1"}
    first = await service.call("POST", "/v1/jobs", data=f"# list\n{url}\n\n", headers=headers)
    again = await service.call("POST", "/v1/jobs", data=f"{url}\n", headers=headers)
    assert (first.status, again.status) == (202, 200)
    assert (await first.json())["id"] == (await again.json())["id"]
    assert (await first.json())["urls"] == 1


async def test_limits_and_bad_requests(service: Service) -> None:
    too_many = {"urls": [f"http://127.0.0.1/{i}.jpg" for i in range(51)]}
    assert await error_of(await service.call("POST", "/v1/jobs", json=too_many)) == (
        413,
        "too_many_urls",
    )
    big = "x" * 5000
    assert (
        await error_of(
            await service.call("POST", "/v1/jobs", data=big, headers={"Content-Type": "text/plain"})
        )
    )[0] == 413
    cases = [
        ({"urls": []}, (400, "no_urls")),
        ({"url": "x"}, (400, "bad_request")),
        ({"urls": ["http://127.0.0.1/a.jpg"], "options": {"timeout": 1}}, (400, "bad_option")),
        (
            {"urls": ["http://127.0.0.1/a.jpg"], "options": {"thumb_sizes": [0]}},
            (400, "bad_option"),
        ),
    ]
    for body, expected in cases:
        assert await error_of(await service.call("POST", "/v1/jobs", json=body)) == expected
    bad_json = await service.call(
        "POST", "/v1/jobs", data="{", headers={"Content-Type": "application/json"}
    )
    assert await error_of(bad_json) == (400, "bad_json")
    assert (await error_of(await service.call("POST", "/v1/jobs", data=b"x")))[0] == 415
    assert await error_of(await service.call("GET", "/v1/jobs/nope")) == (404, "no_such_job")
    assert await error_of(await service.call("GET", "/v1/nothing-here")) == (404, "not_found")
    assert await error_of(await service.call("PUT", "/v1/jobs")) == (405, "method_not_allowed")


async def test_queue_cap(service: Service, server: LocalServer) -> None:
    server.gate.clear()  # nothing finishes while we fill the queue
    url = server.url("/held/a.gif")
    codes = []
    for i in range(10):
        response = await service.call("POST", "/v1/jobs", json={"urls": [f"{url}?{i}"]})
        codes.append(response.status)
    assert codes.count(429) >= 1 and codes[0] == 202
    server.gate.set()


async def test_paging(service: Service, server: LocalServer) -> None:
    server.gate.clear()
    ids = []
    for i in range(3):
        response = await service.call(
            "POST", "/v1/jobs", json={"urls": [server.url(f"/held/a.gif?{i}")]}
        )
        ids.append((await response.json())["id"])
    page1 = await (await service.call("GET", "/v1/jobs?limit=2")).json()
    assert [j["id"] for j in page1["jobs"]] == ids[::-1][:2]
    page2 = await (await service.call("GET", page1["next"])).json()
    assert [j["id"] for j in page2["jobs"]] == ids[:1]
    assert await error_of(await service.call("GET", "/v1/jobs?limit=x")) == (400, "bad_request")
    server.gate.set()


async def test_cancel_a_running_job(service: Service, server: LocalServer) -> None:
    server.add("a.gif", samples.gif_palette())
    server.gate.clear()
    urls = [server.url(f"/held/a.gif?{i}") for i in range(20)]
    job = await (await service.call("POST", "/v1/jobs", json={"urls": urls})).json()
    await service.wait(job["id"], ("running",))
    response = await service.call("DELETE", f"/v1/jobs/{job['id']}")
    assert response.status == 200 and (await response.json())["state"] == "cancelled"
    server.gate.set()
    await asyncio.sleep(0.2)
    assert (await (await service.call("GET", f"/v1/jobs/{job['id']}")).json())[
        "state"
    ] == "cancelled"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        (AUTH, 200),
    ],
)
async def test_auth(service: Service, headers: dict[str, str], status: int) -> None:
    response = await service.client.get("/v1/jobs", headers=headers)
    assert response.status == status
    if status == 401:
        assert await error_of(response) == (401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_health_ready_and_metrics(service: Service, server: LocalServer) -> None:
    assert (await service.client.get("/healthz")).status == 200
    assert (await service.client.get("/readyz")).status == 200
    url = server.add("a.gif", samples.gif_palette())
    job = await (await service.call("POST", "/v1/jobs", json={"urls": [url]})).json()
    await service.wait(job["id"])
    text = await (await service.call("GET", "/metrics")).text()
    for name in ("crawler_urls_total", "crawler_errors_total", "crawler_bytes_total",
                 "crawler_requests_in_flight", "crawler_queue_depth", "crawler_pool_busy_workers",
                 "crawler_event_loop_lag_seconds", "crawler_job_urls_done"):  # fmt: skip
        assert f"# TYPE {name} " in text
    assert 'crawler_urls_total{status="ok"} 1' in text
    service.jobs.accepting = False
    assert await error_of(await service.client.get("/readyz")) == (503, "not_ready")


async def test_openapi_describes_every_route(service: Service) -> None:
    served = await (await service.call("GET", "/v1/openapi.json")).json()
    assert served == spec()
    documented = {
        (method.upper(), path)
        for path, item in served["paths"].items()
        for method in item
        if method != "parameters"
    }
    app = service.client.app
    assert app is not None
    routes = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    assert routes == documented


async def test_ssrf_guard_blocks_non_public_addresses(
    executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    """Loopback only: a literal, a name that resolves to it, and a redirect hop to it."""
    async with LocalServer(addresses=("127.0.0.1", "127.0.0.2")) as srv:
        srv.add("a.gif", samples.gif_palette())
        async with running_service(executor, tmp_path / "closed", []) as svc:
            urls = [
                srv.url("/img/a.gif"),
                f"http://localhost:{srv.port}/img/a.gif",
                srv.url("/img/a.gif?x=1", "127.0.0.2"),
            ]
            job = await (await svc.call("POST", "/v1/jobs", json={"urls": urls})).json()
            done = await svc.wait(job["id"])
            assert done["by_error"] == {"blocked_address": 3}
        # 127.0.0.1 allowed, 127.0.0.2 not: the redirect hop is checked too
        async with running_service(executor, tmp_path / "one", ["127.0.0.1/32"]) as svc:
            urls = [srv.url("/img/a.gif"), srv.url("/redirect-host/127.0.0.2/a.gif")]
            job = await (await svc.call("POST", "/v1/jobs", json={"urls": urls})).json()
            await svc.wait(job["id"])
            text = await (await svc.call("GET", f"/v1/jobs/{job['id']}/records")).text()
            records = [json.loads(line) for line in text.splitlines()]
            assert [(r["status"], r["error"]) for r in records] == [
                ("ok", None),
                ("failed", "blocked_address"),
            ]
            assert records[1]["attempts"] == 1
    assert srv.hits["/img/a.gif"] == 1  # only the allowed fetch reached a server
