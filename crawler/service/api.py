"""The HTTP API (aiohttp.web), versioned under /v1. JSON in and out.

Every error, ours or aiohttp's, leaves as ``{"error": {"code", "message"}}``
with a fitting status: never an HTML page, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import aiofiles.os
from aiohttp import web
from aiohttp.typedefs import Handler

from crawler.service.jobs import JOB_OPTIONS, Job, JobError, Jobs
from crawler.service.metrics import Metrics
from crawler.service.openapi import spec
from crawler.store import image_path, thumb_path

log = logging.getLogger(__name__)

JOBS = web.AppKey("jobs", Jobs)
METRICS = web.AppKey("metrics", Metrics)
TOKEN = web.AppKey("token", str)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
SHA256 = re.compile(r"[0-9a-f]{64}")
IMAGE_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tif": "image/tiff",
}


def make_app(jobs: Jobs, metrics: Metrics, token: str) -> web.Application:
    app = web.Application(
        middlewares=[errors_as_json, authenticate],
        client_max_size=jobs.settings.service.max_body_bytes,
    )
    app[JOBS], app[METRICS], app[TOKEN] = jobs, metrics, token
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{id}", get_job)
    app.router.add_delete("/v1/jobs/{id}", cancel_job)
    app.router.add_get("/v1/jobs/{id}/records", records)
    app.router.add_get("/v1/images/{sha256}", image)
    app.router.add_get("/v1/images/{sha256}/thumbnail", thumbnail)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except JobError as exc:
        return error(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = re.sub(r"\W+", "_", exc.reason.lower()).strip("_")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        response = error(exc.status, code, message)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error(500, "internal", "internal error; see the service log")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[TOKEN]
    if token and request.path not in OPEN_PATHS:
        given = request.headers.get("Authorization", "")
        scheme, _, credential = given.partition(" ")
        # Compare in constant time, as bytes, whatever the input looks like.
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            credential.strip().encode(), token.encode()
        )
        if not ok:
            response = error(401, "unauthorized", "a valid bearer token is required")
            response.headers["WWW-Authenticate"] = 'Bearer realm="crawler"'
            return response
    return await handler(request)


def job_json(
    job: Job, request: web.Request, counts: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "urls": job.urls,
        "options": job.options,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "error": job.error,
        "links": {
            "self": f"/v1/jobs/{job.id}",
            "records": f"/v1/jobs/{job.id}/records",
        },
    }
    if counts is not None:
        body.update(counts)
        end = job.finished if job.state != "running" else None
        elapsed = ((end or time.time()) - job.started) if job.started else 0.0
        body["rate"] = round(counts["done"] / elapsed, 2) if elapsed > 0 else 0.0
    return body


async def submit(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    settings = jobs.settings.service
    if (await asyncio.to_thread(shutil.disk_usage, jobs.root)).free < settings.min_free_bytes:
        raise JobError(507, "disk_full", "not enough free disk space for new jobs")
    urls, options = await _read_submission(request)
    job, new = await jobs.submit(urls, options, request.headers.get("Idempotency-Key"))
    body = job_json(job, request)
    return web.json_response(
        body, status=202 if new else 200, headers={"Location": f"/v1/jobs/{job.id}"}
    )


async def _read_submission(request: web.Request) -> tuple[list[str], dict[str, Any]]:
    if request.content_type in ("text/plain", "text/uri-list"):
        text = await request.text()
        urls = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        return urls, {}
    if request.content_type != "application/json":
        raise JobError(
            415, "unsupported_media_type", "send text/plain (one URL a line) or application/json"
        )
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise JobError(400, "bad_json", f"the body is not valid JSON: {exc.msg}") from None
    if not isinstance(body, dict) or not isinstance(body.get("urls"), list):
        raise JobError(400, "bad_request", 'expected {"urls": [...], "options": {...}}')
    if not all(isinstance(u, str) for u in body["urls"]):
        raise JobError(400, "bad_request", "every URL must be a string")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise JobError(
            400, "bad_option", f"options must be an object with keys from {list(JOB_OPTIONS)}"
        )
    return body["urls"], options


async def list_jobs(request: web.Request) -> web.Response:
    try:
        limit = min(int(request.query.get("limit", "50")), 500)
        before = float(request.query["before"]) if "before" in request.query else None
    except ValueError:
        raise JobError(400, "bad_request", "limit must be an integer, before a timestamp") from None
    if limit < 1:
        raise JobError(400, "bad_request", "limit must be at least 1")
    found = await request.app[JOBS].page(limit, before)
    body: dict[str, Any] = {"jobs": [job_json(j, request) for j in found]}
    if len(found) == limit:
        body["next"] = f"/v1/jobs?limit={limit}&before={found[-1].created!r}"
    return web.json_response(body)


async def get_job(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    job = await jobs.get(request.match_info["id"])
    return web.json_response(job_json(job, request, await jobs.counts(job)))


async def cancel_job(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    job = await jobs.cancel(request.match_info["id"])
    return web.json_response(job_json(job, request, await jobs.counts(job)))


async def records(request: web.Request) -> web.StreamResponse:
    status = request.query.get("status")
    if status is not None and status not in ("ok", "failed", "skipped"):
        raise JobError(400, "bad_request", "status must be ok, failed or skipped")
    lines = request.app[JOBS].records(request.match_info["id"], status)
    first = await anext(lines, None)  # a missing job is still a clean 404
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    if first:
        await response.write(first)
    async for chunk in lines:
        await response.write(chunk)
    await response.write_eof()
    return response


async def image(request: web.Request) -> web.StreamResponse:
    sha = _sha(request)
    root = request.app[JOBS].root
    folder = (root / image_path(sha, "x")).parent
    for ext, content_type in IMAGE_TYPES.items():
        path = folder / f"{sha}.{ext}"
        if await aiofiles.os.path.isfile(path):
            return await _file(request, path, content_type, sha)
    raise JobError(404, "no_such_image", f"no image {sha}")


async def thumbnail(request: web.Request) -> web.StreamResponse:
    sha = _sha(request)
    jobs = request.app[JOBS]
    sizes = jobs.settings.image.thumb_sizes
    try:
        size = int(request.query.get("size", sizes[0]))
    except ValueError:
        raise JobError(400, "bad_request", "size must be an integer") from None
    for ext in ("jpg", "webp"):
        path = jobs.root / thumb_path(size, sha, ext)
        if await aiofiles.os.path.isfile(path):
            return await _file(request, path, IMAGE_TYPES[ext], f"{sha}-{size}")
    raise JobError(404, "no_such_image", f"no {size}px thumbnail of {sha}")


def _sha(request: web.Request) -> str:
    sha = request.match_info["sha256"].lower()
    if not SHA256.fullmatch(sha):
        raise JobError(400, "bad_request", "expected a sha256 of 64 hex digits")
    return sha


async def _file(
    request: web.Request, path: Path, content_type: str, etag: str
) -> web.StreamResponse:
    # Content-addressed: the bytes behind a name never change, so the hash is the ETag.
    headers = {
        "ETag": f'"{etag}"',
        "Cache-Control": "public, max-age=31536000, immutable",
        "Content-Type": content_type,
    }
    if request.headers.get("If-None-Match") == f'"{etag}"':
        return web.Response(status=304, headers=headers)
    size = await aiofiles.os.path.getsize(path)
    response = web.StreamResponse(headers={**headers, "Content-Length": str(size)})
    await response.prepare(request)
    async with aiofiles.open(path, "rb") as fh:
        while chunk := await fh.read(256 * 1024):
            await response.write(chunk)
    await response.write_eof()
    return response


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(spec())


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if not request.app[JOBS].accepting:
        raise JobError(503, "not_ready", "not accepting jobs")
    return web.json_response({"status": "ready"})


async def metrics_page(request: web.Request) -> web.Response:
    text = await request.app[METRICS].render()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")
