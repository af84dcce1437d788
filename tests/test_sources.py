from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yarl

from crawler.models import UrlEntry
from crawler.sources import SourceError, check_url, normalise_target, open_source


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


async def test_long_list_is_streamed_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking the first entry parses one batch, not the file."""
    from crawler import sources

    f = tmp_path / "many.txt"
    f.write_text("".join(f"http://a.test/{i}.jpg\n" for i in range(5000)))
    parsed = 0
    real_parse = sources._parse

    def counting_parse(*args: Any) -> Iterator[UrlEntry]:
        nonlocal parsed
        for entry in real_parse(*args):
            parsed += 1
            yield entry

    monkeypatch.setattr(sources, "_parse", counting_parse)
    it = open_source(str(f)).entries()
    first = await anext(it)
    assert first.url == "http://a.test/0.jpg"
    assert parsed <= sources.BATCH + 1 < 5000  # one batch read ahead, not the whole list
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


# --- check_url: RFC 3986 6.2.2 syntax-based normalisation ------------------------------------

_LONGEST_HOST = ("a" * 63 + ".") * 3 + "a" * 61  # 253 characters, the most DNS allows


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://a.test/%7e%2f%3f", "http://a.test/~%2F%3F"),  # hex upper-cased
        ("http://a.test/%41%62%2D%2E%5F%7E%30", "http://a.test/Ab-._~0"),  # unreserved decoded
        ("http://a.test/a%2Fb", "http://a.test/a%2Fb"),  # "/" stays encoded
        ("http://a.test/a%2fb", "http://a.test/a%2Fb"),
        ("http://a.test/%3f%23%26%3d%2b%25", "http://a.test/%3F%23%26%3D%2B%25"),
        ("http://a.test/x?q=%2b%26%3d%3f%23%2f", "http://a.test/x?q=%2B%26%3D%3F%23%2F"),
        ("http://a.test/x?q=%61%62c", "http://a.test/x?q=abc"),
        ("http://a.test/%c3%bc", "http://a.test/%C3%BC"),  # non-ASCII bytes stay encoded
        ("http://a.test/%FC", "http://a.test/%FC"),  # not UTF-8: left as bytes
        ("http://us%65r:p%40ss%3a@a.test/", "http://user:p%40ss%3A@a.test/"),  # userinfo too
    ],
)
def test_check_url_normalises_percent_encoding(raw: str, expected: str) -> None:
    assert check_url(raw) == (expected, "")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://a.test/bücher.jpg", "http://a.test/b%C3%BCcher.jpg"),
        ("http://a.test/x?q=ü&r=日本", "http://a.test/x?q=%C3%BC&r=%E6%97%A5%E6%9C%AC"),
        ("http://a.test/😀", "http://a.test/%F0%9F%98%80"),
        ("http://a.test/zero\u200bwidth", "http://a.test/zero%E2%80%8Bwidth"),
        ('http://a.test/{a}|b\\c^`"<>', "http://a.test/%7Ba%7D%7Cb%5Cc%5E%60%22%3C%3E"),
        ("http://a.test/x?a[]=1&b={2}", "http://a.test/x?a%5B%5D=1&b=%7B2%7D"),
        ("http://a.test/x?next=/a/b?c:d@e", "http://a.test/x?next=/a/b?c:d@e"),  # allowed as is
        ("http://us@r:pä@a.test/", "http://us%40r:p%C3%A4@a.test/"),  # last "@" ends userinfo
        ("http://a.test/!$&'()*+,;=:@", "http://a.test/!$&'()*+,;=:@"),  # sub-delims untouched
    ],
)
def test_check_url_encodes_characters_that_must_be_encoded(raw: str, expected: str) -> None:
    assert check_url(raw) == (expected, "")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/./b/../c", "/a/c"),
        ("/a/b/c/./../../g", "/a/g"),  # RFC 3986 5.2.4's own example
        ("/mid/content=5/../6", "/mid/6"),  # and its other one
        ("/./a", "/a"),
        ("/..", "/"),
        ("/../../a", "/a"),  # cannot climb above the root
        ("/a/..", "/"),
        ("/a/b/.", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/a/%2E%2e/b", "/b"),  # "%2E" is "."
        ("/a/.%2E/b", "/b"),
        ("/a//../b", "/a/b"),
        ("/..//a", "//a"),
        ("/a/.b/..c/.../", "/a/.b/..c/.../"),  # not dot segments
        ("/a/b?x=/../y", "/a/b?x=/../y"),  # the query is not a path
    ],
)
def test_check_url_removes_dot_segments(path: str, expected: str) -> None:
    assert check_url(f"http://a.test{path}") == (f"http://a.test{expected}", "")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://example.com./a", "http://example.com/a"),
        ("http://EXAMPLE.com.:8080/a", "http://example.com:8080/a"),
        ("http://bücher.example./", "http://xn--bcher-kva.example/"),
        ("http://127.0.0.1/", "http://127.0.0.1/"),
        # IPv4 literals as written: numeric tricks are for the SSRF guard, not for here.
        ("http://0x7f.1/", "http://0x7f.1/"),
        ("http://2130706433/", "http://2130706433/"),
        ("http://0177.0.0.01/", "http://0177.0.0.01/"),
        ("http://[2001:DB8::AbC]/", "http://[2001:db8::abc]/"),
        ("http://[2001:DB8::1]:443/", "http://[2001:db8::1]:443/"),
        ("https://[::FFFF:1.2.3.4]:443/", "https://[::ffff:1.2.3.4]/"),
        ("http://[FE80::1%25Eth0]/", "http://[fe80::1%25Eth0]/"),  # a zone id keeps its case
        ("http://user@Host.test:80", "http://user@host.test/"),
        (f"http://{_LONGEST_HOST}./", f"http://{_LONGEST_HOST}/"),
    ],
)
def test_check_url_normalises_host(raw: str, expected: str) -> None:
    assert check_url(raw) == (expected, "")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # A bare "?" is dropped: aiohttp (yarl) never sends it, so keeping it would
        # give one request two keys.
        ("http://a.test/x?", "http://a.test/x"),
        ("http://a.test/x?#frag", "http://a.test/x"),
        ("http://a.test?", "http://a.test/"),
        # Everything else in the query is kept, in order, empty parameters included.
        ("http://a.test/x?b=2&a=1&&a=0&", "http://a.test/x?b=2&a=1&&a=0&"),
        ("http://a.test/x??", "http://a.test/x??"),
        ("http://a.test/x?=", "http://a.test/x?="),
    ],
)
def test_check_url_query_order_and_empty_query(raw: str, expected: str) -> None:
    assert check_url(raw) == (expected, "")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # A "%" that starts no escape is left as it is (aiohttp sends it as "%25") ...
        ("http://a.test/100%", "http://a.test/100%"),
        ("http://a.test/%zz", "http://a.test/%zz"),
        ("http://a.test/%4", "http://a.test/%4"),
        ("http://a.test/x?p=%&q=%g1", "http://a.test/x?p=%&q=%g1"),
        ("http://a.test/%%41", "http://a.test/%%41"),
        # ... and no escape of a hex digit is decoded next to it, or "%%414" would
        # become the different "%A4"; other escapes are still normalised.
        ("http://a.test/%%414", "http://a.test/%%414"),
        ("http://a.test/%zz%2e%7e%4a%2f%41", "http://a.test/%zz.~J%2F%41"),
        ("http://a.test/x%/../%41", "http://a.test/A"),  # the stray "%" went with its segment
        ("http://a.test/%41?q=%", "http://a.test/A?q=%"),  # per component
    ],
)
def test_check_url_keeps_invalid_escapes(raw: str, expected: str) -> None:
    assert check_url(raw) == (expected, "")


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("http://a.test/%7Euser/x.jpg", "http://a.test/~user/x.jpg"),
        ("http://a.test/a%2fb", "http://a.test/a%2Fb"),
        ("http://a.test/a/./b/../c.jpg", "http://a.test/a/c.jpg"),
        ("http://a.test/%62ücher.jpg", "http://a.test/b%c3%bccher.jpg"),
        ("HTTP://A.TEST./x", "http://a.test/x"),
        ("http://a.test:80/x", "http://a.test/x"),
        ("http://a.test/x?q=%7e", "http://a.test/x?q=~"),
        ("http://a.test/x?q=ü#top", "http://a.test/x?q=%C3%BC"),
        ("http://a.test/x?", "http://a.test/x"),
        ("http://a.test", "http://a.test/"),
        ("http://[::A]/", "http://[::a]/"),
    ],
)
def test_check_url_same_resource_same_key(one: str, other: str) -> None:
    key, _ = check_url(one)
    assert key is not None
    assert key == check_url(other)[0]


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("http://a.test/a.jpg", "http://a.test/b.jpg"),
        ("http://a.test/a%2Fb", "http://a.test/a/b"),  # %2F is not a path separator
        ("http://a.test/A.jpg", "http://a.test/a.jpg"),  # paths are case-sensitive
        ("http://a.test/x?a=1&b=2", "http://a.test/x?b=2&a=1"),  # parameter order matters
        ("http://a.test/x?A=1", "http://a.test/x?a=1"),
        ("http://a.test/x?q=a%2Bb", "http://a.test/x?q=a+b"),
        ("http://a.test/x?q=a%26b=c", "http://a.test/x?q=a&b=c"),
        ("http://a.test/x?q=a%3Db", "http://a.test/x?q=a=b"),
        ("http://a.test/x%3Fq=1", "http://a.test/x?q=1"),
        ("http://a.test/x%23y", "http://a.test/x#y"),
        ("http://a.test/%25", "http://a.test/%"),
        ("http://a.test/%%414", "http://a.test/%A4"),
        ("http://a.test/%C3%BC", "http://a.test/%FC"),  # UTF-8 vs Latin-1 bytes
        ("http://a.test/a//b", "http://a.test/a/b"),  # empty segments are kept
        ("http://a.test/a/", "http://a.test/a"),
        ("http://a.test/x?", "http://a.test/x?%20"),
        ("http://a.test/x", "http://a.test:8080/x"),
        ("http://a.test/x", "https://a.test/x"),
        ("http://a.test/x", "http://user@a.test/x"),
        ("http://a.test/x", "http://a.test/x/."),
        ("http://127.0.0.1/", "http://2130706433/"),
    ],
)
def test_check_url_different_resources_different_keys(one: str, other: str) -> None:
    key, _ = check_url(one)
    assert key is not None
    assert key != check_url(other)[0]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("http://[::1]x/a.jpg", "malformed host"),  # used to become http://[::1]/a.jpg
        ("http://a.test[::1]/", "malformed host"),  # used to become http://[::1]/
        ("http://a.test/\ud800", "lone surrogate"),
        ("http://a..test/", "invalid host name"),
        ("http://./", "invalid host name"),
        ("http://a<b>.test/", "invalid host name"),
        ("http://ex%41mple.test/", "invalid host name"),
        ("http://a.test:８０/", "malformed"),
        ("http://u[::1]@[::2]/", "brackets in the user name"),
        ("http://" + "a" * 64 + ".test/", "invalid host name"),  # a label has at most 63
        ("http://" + "a." * 127 + "ab/", "longer than 253"),
        (f"http://{_LONGEST_HOST}a/", "longer than 253"),
        ("http://" + "ü" * 60 + ".test/", "invalid host name"),  # label > 63 after IDNA
        ("http://" + ("ü" * 20 + ".") * 11 + "test/", "longer than 253"),  # after IDNA
        ("http://" + "é" * 4000 + "/", "longer than 253"),
    ],
)
def test_check_url_rejects_bad_hosts(raw: str, reason: str) -> None:
    url, why = check_url(raw)
    assert url is None
    assert reason in why


def test_check_url_rejects_exactly_whitespace_and_controls() -> None:
    # Every str.isspace() character is below U+3001.
    bad = [c for c in map(chr, range(0x3001)) if c.isspace() or ord(c) < 32 or ord(c) == 127]
    for c in bad:
        assert check_url(f"http://a.test/x{c}y") == (
            None,
            "URL contains whitespace or control characters",
        ), repr(c)
    for c in "\x80\x9f\u00ad\u200b\u200e\ufeff":  # C1 and format characters: encoded
        url, _ = check_url(f"http://a.test/x{c}y")
        assert url is not None and url.isascii(), repr(c)


def _rfc3986_remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, step by step as written: the oracle for the fast version."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith(("./", "/./")):
            inp = inp[2:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../") or inp == "/..":
            inp = "/" + inp[4:]
            out = out[: max(out.rfind("/"), 0)]
        elif inp in (".", ".."):
            inp = ""
        else:
            end = inp.find("/", 1)
            end = len(inp) if end == -1 else end
            out, inp = out + inp[:end], inp[end:]
    return out


def test_check_url_dot_segments_match_rfc_algorithm() -> None:
    rng = random.Random(3986)
    for _ in range(3000):
        segments = rng.choices(["a", "b", ".", "..", "", ".c", "..d", "..."], k=rng.randint(1, 8))
        path = "/" + "/".join(segments)
        assert check_url(f"http://a.test{path}") == (
            f"http://a.test{_rfc3986_remove_dot_segments(path)}",
            "",
        ), path


_FUZZ_PIECES = [
    *("http://", "https://", "HTTP://", "ftp://", "//", "a.test", "A.TEST.", "[::1]", "[::A]"),
    *("u:p@", "@", ":", ":80", ":8080", "/", "/", "/", ".", "..", "?", "#", "&", "=", "+"),
    *("%", "%%", "%zz", "%4", "%2f", "%2F", "%2e", "%2E", "%41", "%7e", "%e9", "%25", "%3F"),
    *("é", "ü", "ß", "日本", "😀", "\u3002", "／", "\ud800", "\u200b", " ", "\t", "\x00"),
    *("[", "]", "\\", "{", "}", "|", "<", '"', "'", "~", "0", "F", "xn--", "-"),
]


def _fuzz_inputs(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    inputs = []
    for _ in range(count):
        pieces = [
            rng.choice(_FUZZ_PIECES) if rng.random() < 0.9 else chr(rng.randrange(0x110000))
            for _ in range(rng.randint(0, 12))
        ]
        if rng.random() < 0.7:  # mostly URLs that get past the scheme and host checks
            pieces[:0] = [
                rng.choice(["http://", "https://"]),
                rng.choice(["a.test", "[::1]", "u:p@a.test", "bü.test."]),
                rng.choice(["/", "/", "/", ":8080/", "?", ""]),
            ]
        inputs.append("".join(pieces))
    return inputs


def test_check_url_fuzz_never_raises_and_is_idempotent() -> None:
    accepted = 0
    for raw in _fuzz_inputs(20000, seed=6222):
        key, why = check_url(raw)
        if key is None:
            assert why, repr(raw)
            continue
        accepted += 1
        assert why == ""
        assert key.isascii() and "#" not in key, (raw, key)
        assert check_url(key) == (key, ""), (raw, key)  # a key is its own key
    assert accepted > 5000  # the fuzzing reached the normalisation, not just the checks


def test_check_url_never_changes_what_aiohttp_requests() -> None:
    """aiohttp sends ``yarl.URL(key)``; it must ask for what the input asked for."""
    compared = 0
    for raw in _fuzz_inputs(20000, seed=5322):
        key, _ = check_url(raw)
        if key is None:
            continue
        try:
            given = yarl.URL(raw.strip())
        except ValueError:
            continue
        assert yarl.URL(key).raw_path_qs == given.raw_path_qs, (raw, key)
        compared += 1
    assert compared > 5000


def test_check_url_long_inputs_stay_fast() -> None:
    worst = [
        "http://a.test/" + piece * (8000 // len(piece))
        for piece in ("%", "%4", "%41", "é", "/..", "/.", "a/", "{", "%zz%2e")
    ] + [
        "http://" + piece * (8000 // len(piece)) + "/"
        for piece in ("a", "a.", "é", "é.", "a" * 63 + ".", "[", "%")
    ]
    worst += ["http://" + "é" * 254 + "/", "http://" + ("é" * 20 + ".") * 12 + "/"]
    start = time.perf_counter()
    for raw in worst:
        check_url(raw)
    assert time.perf_counter() - start < 1.0  # about 10 ms in all; guards against quadratic work


@pytest.mark.parametrize(
    "target",
    ["/caf%c3%a9/a.jpg?q=%7e", '/café/"b".jpg', "/x%2Fy?a=%3D&b=%26", "/50%off", "/%41%2a"],
)
def test_normalise_target_spells_a_target_as_check_url_does(target: str) -> None:
    key, _ = check_url(f"http://h.example{target}")
    assert key is not None
    assert normalise_target(target) == key.removeprefix("http://h.example")
    assert normalise_target(normalise_target(target)) == normalise_target(target)
