"""The tutorial-style baseline: the same crawl, with the image work done on the event loop.

``python -m bench.inline URLS OUT`` runs ``crawler.pipeline.crawl`` with an
executor that runs each call right away, in the loop's own thread: decode,
thumbnail and hash block the loop exactly as a crawler that calls Pillow from
a coroutine does. Everything else is the crawler's own code and settings.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import uvloop

from crawler.pipeline import crawl
from crawler.settings import load_settings
from crawler.sources import open_source

P = ParamSpec("P")
T = TypeVar("T")


class InlineExecutor(Executor):
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


async def main(urls: str, out: str) -> dict[str, Any]:
    settings = load_settings(overrides={"crawl": {"out": out, "progress": False}})
    summary = await crawl(open_source(urls).entries(), settings, executor=InlineExecutor())
    return summary.to_dict()


if __name__ == "__main__":
    urls, out, stats = sys.argv[1:4]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(main(urls, out))
    Path(stats).write_text(json.dumps(result))
