from __future__ import annotations

from pathlib import Path

import pytest

from crawler.models import UrlEntry
from crawler.sources import SourceError, check_url, open_source


async def collect(path: Path, fmt: str = "auto") -> list[UrlEntry]:
    return [e async for e in open_source(str(path), fmt).entries()]


async def test_text_skips_blanks_and_comments(tmp_path: Path) -> None:
    f = tmp_path / "urls.txt"
    f.write_text("# header\n\nhttp://a.test/1.jpg\n   \n  http://a.test/2.jpg  \n#x\n")
    got = await collect(f)
    assert [(e.url, e.line) for e in got] == [
        ("http://a.test/1.jpg", 3),
        ("http://a.test/2.jpg", 5),
    ]
    assert await open_source(str(f)).count() == 2


async def test_csv_carries_other_columns_as_meta(tmp_path: Path) -> None:
    f = tmp_path / "urls.csv"
    f.write_text(
        'id,URL,caption\n1,http://a.test/1.jpg,"a cat, sitting"\n\n2,http://a.test/2.jpg,dog\n'
    )
    got = await collect(f)
    assert [e.url for e in got] == ["http://a.test/1.jpg", "http://a.test/2.jpg"]
    assert got[0].meta == {"id": "1", "caption": "a cat, sitting"}
    assert await open_source(str(f)).count() == 2


async def test_tsv_and_bad_rows_become_problems(tmp_path: Path) -> None:
    f = tmp_path / "urls.tsv"
    f.write_text("url\tlabel\nhttp://a.test/1.jpg\tx\nhttp://a.test/2.jpg\n")
    got = await collect(f)
    assert got[0].meta == {"label": "x"}
    assert got[1].problem is not None and "columns" in got[1].problem


async def test_jsonl_meta_and_bad_lines(tmp_path: Path) -> None:
    f = tmp_path / "urls.jsonl"
    f.write_text(
        '{"url": "http://a.test/1.jpg", "id": 7, "tags": ["a"]}\nnot json\n[1]\n{"href": "x"}\n'
    )
    got = await collect(f)
    assert got[0].url == "http://a.test/1.jpg" and got[0].meta == {"id": 7, "tags": ["a"]}
    assert [e.problem is not None for e in got] == [False, True, True, True]
    assert "not valid JSON" in (got[1].problem or "")


async def test_long_list_is_streamed_in_batches(tmp_path: Path) -> None:
    f = tmp_path / "many.txt"
    f.write_text("".join(f"http://a.test/{i}.jpg\n" for i in range(5000)))
    it = open_source(str(f)).entries()
    first = await anext(it)
    assert first.url == "http://a.test/0.jpg"
    await it.aclose()


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (None, "absent.txt", "cannot read"),
        ("id,link\n1,x\n", "urls.csv", "no 'url' column"),
        ("", "urls.csv", "empty CSV"),
    ],
)
def test_unreadable_inputs_are_usage_errors(
    tmp_path: Path, content: str | None, name: str, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(SourceError, match=message):
        open_source(str(path))


def test_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="directory"):
        open_source(str(tmp_path))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://Example.COM/a.jpg", "http://example.com/a.jpg"),
        ("HTTPS://example.com:443/a.jpg#frag", "https://example.com/a.jpg"),
        ("http://example.com:8080", "http://example.com:8080/"),
        ("http://bücher.example/x.png?q=1", "http://xn--bcher-kva.example/x.png?q=1"),
        ("http://[::1]:8080/a.gif", "http://[::1]:8080/a.gif"),
    ],
)
def test_check_url_normalises(raw: str, expected: str) -> None:
    assert check_url(raw) == (expected, "")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("file:///etc/passwd", "unsupported scheme 'file'"),
        ("ftp://example.com/a.jpg", "unsupported scheme 'ftp'"),
        ("javascript:alert(1)", "unsupported scheme 'javascript'"),
        ("not a url", "whitespace"),
        ("example.com/a.jpg", "not a URL"),
        ("http://", "no host"),
        ("http://example.com:99999/", "malformed"),
        ("http://exa\x00mple.com/", "control"),
    ],
)
def test_check_url_rejects(raw: str, reason: str) -> None:
    url, why = check_url(raw)
    assert url is None
    assert reason in why
