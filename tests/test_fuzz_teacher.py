"""Generated server replies at the boundary a remote teacher hands us text through: HTTPTeacher.chat
(thinkrec/reasoning/teacher.py) against any OpenAI-compatible server. The promise under test: whatever the
server answers (any status code, any JSON or not-JSON body, wrong types anywhere in the completion, a cut
body or chunked stream, bad gzip, non-UTF-8 bytes, huge strings, a dropped or timed-out connection), a call
either returns a well-typed Reply or raises our user-error type (TeacherError) with a one-line message that
names the teacher (its URL and model) and never an API key; never another exception, never a hang, and the
retries, backoff sleeps and stats follow the documented policy.

No sockets: each teacher's requests.Session gets an adapter whose connection pool answers from canned raw
HTTP bytes. Everything from those bytes up is the real code a live server would exercise: http.client parses
the status line and headers, urllib3 frames the body (Content-Length, chunked, gzip) and requests decodes it;
only urllib3's socket handling is replaced, and its exceptions are raised the way its connection pool raises
them. Backoff sleeps are recorded instead of slept.

CI runs each property with a fixed seed and a bounded number of examples; THINKREC_FUZZ_EXAMPLES=N runs N per
property (a long run), and the number of examples tried is printed at the end of the module.
"""

import gzip
import http.client
import io
import json
import math
import signal
import zlib
from contextlib import contextmanager

import pytest

hypothesis = pytest.importorskip("hypothesis")
import requests  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzzing import count_report, fuzz_settings  # noqa: E402
from urllib3 import HTTPResponse  # noqa: E402
from urllib3._collections import HTTPHeaderDict  # noqa: E402
from urllib3.exceptions import (ConnectTimeoutError, MaxRetryError, NewConnectionError, ProtocolError,  # noqa: E402
                                ReadTimeoutError, SSLError)

from thinkrec.errors import USER_ERRORS, UserError  # noqa: E402
from thinkrec.reasoning.teacher import HTTPTeacher, Reply, TeacherError  # noqa: E402

FUZZ = fuzz_settings(120)
TRIED = {"teacher replies": 0}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

URL, MODEL, KEY = "http://teacher.invalid:8000/v1", "fuzz-model", "sk-fuzz-secret-key"
MESSAGES = [{"role": "user", "content": "Will user 7 like Heat (1995)?"}]
HANG_SECONDS = 30  # one call (a few attempts over canned bytes) takes milliseconds; this long is a hang


_report_counts = count_report(TRIED, "a typed Reply or a one-line TeacherError, no traceback, no hang")


# ---------------------------------------------------------------------------------- the canned server
class _Socket:
    """What http.client.HTTPResponse reads a reply from: the raw bytes, then EOF (the server closed)."""

    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, mode, *args, **kwargs):
        return io.BytesIO(self.data)


class _Pool:
    """A urllib3 connection pool whose urlopen answers attempt k with script[k] (the last one repeats): raw
    HTTP bytes, parsed and framed as urllib3's HTTPConnection.getresponse does, or a transport failure raised
    as urllib3's pool raises it."""

    def __init__(self, script: list):
        self.script, self.calls = script, 0

    def urlopen(self, method, url, **kwargs):
        answer = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if callable(answer):
            raise answer(url)
        raw = http.client.HTTPResponse(_Socket(answer), method=method)
        try:
            raw.begin()
        except (http.client.HTTPException, OSError) as e:  # urllib3's pool: no retries, read=False
            raise ProtocolError("Connection aborted.", e) from e
        headers = HTTPHeaderDict()
        for k, v in raw.getheaders():
            headers.add(k, v)
        return HTTPResponse(body=raw, headers=headers, status=raw.status, version=raw.version, reason=raw.reason,
                            preload_content=False, decode_content=False, original_response=raw,
                            enforce_content_length=True, request_method=method, request_url=url)


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' own HTTPAdapter.send (headers, timeouts, its mapping of urllib3 errors) over a _Pool."""

    def __init__(self, pool: _Pool):
        super().__init__()
        self.pool = pool

    def get_connection_with_tls_context(self, *args, **kwargs):  # requests >= 2.32
        return self.pool

    def get_connection(self, *args, **kwargs):  # older requests
        return self.pool


def canned_teacher(script: list, retries: int, sleeps: list) -> tuple:
    """An HTTPTeacher (one API key, so masking is checked) whose session answers from `script`."""
    teacher = HTTPTeacher(URL, MODEL, api_keys=[KEY], timeout=5.0, retries=retries, backoff=0.5, max_backoff=4.0)
    teacher._sleep = sleeps.append
    pool = _Pool(script)
    session = requests.Session()
    session.mount("http://", _Adapter(pool))
    session.mount("https://", _Adapter(pool))
    teacher._local.session = session
    return teacher, pool


class _Hung(BaseException):  # not an Exception: nothing in requests or the client may swallow it
    pass


@contextmanager
def _no_hang(seconds: float = HANG_SECONDS):
    if not hasattr(signal, "setitimer"):
        yield
        return

    def _alarm(signum, frame):
        raise _Hung(f"the teacher call did not end within {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------- generators
class Raw(str):
    """JSON text put into a generated body verbatim: what json.dumps cannot write (NaN, a 5000-digit number,
    deep nesting, a lone surrogate escape)."""


def to_json(value, ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=ascii_only)}: {to_json(v, ascii_only)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_json(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


KEYS = ["choices", "message", "content", "reasoning_content", "reasoning", "finish_reason", "usage", "prompt_tokens",
        "completion_tokens", "total_tokens", "error", "detail", "index", "role", "text", "type"]
# huge values are built by .map, so hypothesis never writes them out in a strategy's repr
ODD_TEXT = st.one_of(
    st.sampled_from(["", " ", "\n", "Yes.", " No. ", "<think>", "</think>", "<think>Likes crime.</think>Yes.",
                     "Likes crime.\n</think>\nYes.", "<think>cut off", "\x00", "é", "😀", "\ud800", "\r\n\x85", "\u2028",
                     "stop", "length", KEY, f"Incorrect API key provided: {KEY}\nline two"]),
    st.sampled_from([301, 70_000]).map(lambda n: "x" * n))
RAW_JSON = st.one_of(
    st.sampled_from([Raw("NaN"), Raw("-Infinity"), Raw("1e400"), Raw('"\\ud800"'), Raw('"\\udfff\\ud800"'),
                     Raw("{}"), Raw("[]")]),
    st.sampled_from([900, 2000, 100_000]).map(lambda n: Raw("[" * n + "]" * n)),  # deeper than Python recurses
    st.sampled_from([900, 2000]).map(lambda n: Raw('{"a": ' * n + "1" + "}" * n)),
    st.sampled_from([4300, 5000]).map(lambda n: Raw("9" * n)))  # more digits than int() parses by default
scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=12),
                   ODD_TEXT, RAW_JSON)
json_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4), max_leaves=8)
text_or_any = st.one_of(ODD_TEXT, st.text(max_size=40), st.none(), json_value)
count = st.one_of(st.integers(-5, 10**7), st.floats(), st.sampled_from(["12", "1.5", "", "x", True]), RAW_JSON,
                  json_value)
usage = st.one_of(json_value, st.fixed_dictionaries({}, optional={"prompt_tokens": count, "completion_tokens": count,
                                                                  "total_tokens": count}))
content_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text_or_any}), max_size=2)
message = st.one_of(json_value, st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["assistant", None, 3]), "content": st.one_of(text_or_any, content_parts),
    "reasoning_content": text_or_any, "reasoning": text_or_any}))
choice = st.one_of(json_value, st.fixed_dictionaries({}, optional={
    "index": st.sampled_from([0, 1, "0", None]), "message": message, "finish_reason": text_or_any,
    "text": text_or_any}))
choices = st.one_of(json_value, st.lists(choice, max_size=3))
chat_shaped = st.fixed_dictionaries(  # the shape a server means to send, any value in its fields
    {"choices": st.lists(st.fixed_dictionaries({"message": message}, optional={"finish_reason": text_or_any}),
                         min_size=1, max_size=2)}, optional={"usage": usage})
completion = st.one_of(
    json_value,
    st.fixed_dictionaries({}, optional={"id": st.just("chatcmpl-fuzz"), "object": st.just("chat.completion"),
                                        "choices": choices, "usage": usage, "error": json_value}),
    chat_shaped)
error_body = st.one_of(
    json_value,
    st.fixed_dictionaries({"error": st.one_of(st.fixed_dictionaries({}, optional={"message": text_or_any,
                                                                                  "code": json_value}),
                                              text_or_any)}),
    st.fixed_dictionaries({"detail": text_or_any}),
)
STATUS = st.one_of(st.sampled_from([200, 200, 200, 201, 204, 100, 101, 301, 304, 400, 401, 403, 404, 408, 413, 422,
                                    429, 429, 500, 502, 503, 504, 599, 600, 999]), st.integers(100, 999))
RETRY_AFTER = st.sampled_from([None, "0", "0.25", "1.5", "-3", "nan", "inf", "-inf", "1e400", "3600",
                               "Wed, 21 Oct 2015 07:28:00 GMT", "", "abc", " 2 "])
CONTENT_TYPE = st.sampled_from([None, "application/json", "application/json; charset=utf-8", "text/html",
                                "application/json; charset=latin-1", "application/json; charset=nonsense",
                                "text/plain; charset=utf-16", "application/octet-stream"])
FRAMING = st.sampled_from(["length", "length", "length", "eof", "long", "short", "chunked", "chunked-cut",
                           "chunked-bad", "bad-length"])
WELL_FRAMED = st.sampled_from(["length", "eof", "chunked"])
ENCODING = st.sampled_from([None, None, None, "gzip", "gzip-cut", "gzip-lie", "deflate", "identity"])
WELL_ENCODED = st.sampled_from([None, "gzip", "deflate", "identity"])


@st.composite
def body_bytes(draw, value, damaged: bool = True) -> bytes:
    """A JSON value as a body: maybe re-encoded, cut, salted with stray bytes, or replaced by not-JSON."""
    text = to_json(value, ascii_only=draw(st.booleans()))
    if not damaged:
        return text.encode("utf-8", errors="surrogatepass")
    data = text.encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "latin-1"])), errors="replace")
    damage = draw(st.integers(0, 9))
    if damage == 0:
        data = data[:draw(st.integers(0, len(data)))]  # cut anywhere
    elif damage == 1:
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=4)) + data[pos:]  # stray bytes, maybe not UTF-8
    elif damage == 2:
        data = draw(st.one_of(st.binary(max_size=64), st.sampled_from(
            [b"", b" ", b"<html>502 Bad Gateway</html>", b"\xff\xfe\x00", b"null", b"\xef\xbb\xbf{}", b"{",
             b"data: {\"choices\": []}\n\ndata: [DONE]\n\n"]), st.just(200_000).map(lambda n: b"x" * n)))
    return data


@st.composite
def http_reply(draw, status=STATUS, body=completion, framing=FRAMING, encoding=ENCODING, damaged=True) -> bytes:
    """Raw HTTP/1.1 reply bytes: status line, headers, and the body framed (or misframed) some way."""
    code = draw(status)
    data = draw(body_bytes(draw(body if 200 <= code < 300 else st.one_of(error_body, body)), damaged))
    headers = []
    if (ctype := draw(CONTENT_TYPE)) is not None:
        headers.append(("Content-Type", ctype))
    if (retry_after := draw(RETRY_AFTER)) is not None:
        headers.append(("Retry-After", retry_after))
    encoding = draw(encoding)
    if encoding is not None:
        if encoding.startswith("gzip"):
            data = data if encoding == "gzip-lie" else gzip.compress(data)
            data = data[:len(data) // 2] if encoding == "gzip-cut" else data
            encoding = "gzip"
        elif encoding == "deflate":
            data = zlib.compress(data)
        headers.append(("Content-Encoding", encoding))
    framing = draw(framing)
    if framing.startswith("chunked"):
        headers.append(("Transfer-Encoding", "chunked"))
        size = draw(st.integers(1, 4096))
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        if framing == "chunked-cut":
            wire = wire[:draw(st.integers(0, max(0, len(wire) - 1)))]
        elif framing == "chunked-bad":
            wire = b"zz\r\n" + wire
        data = wire
    elif framing != "eof":
        length = {"length": len(data), "long": len(data) + draw(st.integers(1, 100)),
                  "short": max(0, len(data) - draw(st.integers(1, 100)))}.get(framing, "12abc")
        headers.append(("Content-Length", str(length)))
    reason = draw(st.sampled_from(["OK", "", "Error", "Weird Reason"]))
    head = f"HTTP/1.1 {code} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + data


# a 200 whose body arrives whole and is JSON of the chat completion's shape: the fields are what is fuzzed
SHAPED = http_reply(status=st.just(200), body=chat_shaped, framing=WELL_FRAMED, encoding=WELL_ENCODED, damaged=False)


def _fail(exc):
    return st.just(lambda url: exc(url))


TRANSPORT = st.one_of(
    _fail(lambda url: ReadTimeoutError(None, url, "Read timed out. (read timeout=5.0)")),
    _fail(lambda url: MaxRetryError(None, url, ConnectTimeoutError(None, "Connection timed out"))),
    _fail(lambda url: MaxRetryError(None, url, NewConnectionError(None, "Failed to establish a new connection: "
                                                                        "[Errno 111] Connection refused"))),
    _fail(lambda url: ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))),
    _fail(lambda url: ConnectionResetError(104, "Connection reset by peer")),
    _fail(lambda url: SSLError("[SSL: WRONG_VERSION_NUMBER] wrong version number\n(_ssl.c:1006)")),
    st.sampled_from([b"", b"HTTP/1.1\r\n\r\n", b"garbage\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n",
                     b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n"]),  # closed before / inside the headers
    st.just(70_000).map(lambda n: b"HTTP/1.1 200 OK\r\nX: " + b"y" * n + b"\r\n\r\n"),  # a header line too long
)


# --------------------------------------------------------------------------------------------- checks
def _chat_keeps_its_promise(script: list, retries: int):
    """HTTPTeacher.chat over `script`: a typed Reply or a one-line TeacherError naming the teacher, with
    attempts, sleeps and stats as documented. Returns (reply or error, attempts, sleeps)."""
    TRIED["teacher replies"] += 1
    sleeps = []
    teacher, pool = canned_teacher(script, retries, sleeps)
    try:
        with _no_hang():
            got = teacher.chat(MESSAGES, max_tokens=64)
    except TeacherError as e:
        got = e
        msg = str(e)
        assert isinstance(e, UserError) and isinstance(e, USER_ERRORS)
        assert msg.startswith(f"{URL} {MODEL}: ") and msg.splitlines() == [msg], msg  # names it, one line
        assert KEY not in msg, msg
        assert 0 <= e.retries <= retries and pool.calls == e.retries + 1, (msg, pool.calls)
        assert "gave up after" not in msg or f"gave up after {retries} retries" in msg, msg
        assert teacher.stats.snapshot() == {"requests": 1, "retries": e.retries, "failures": 1, "prompt_tokens": 0,
                                            "completion_tokens": 0}
    else:
        assert isinstance(got, Reply)
        assert isinstance(got.content, str) and got.content == got.content.strip()
        assert isinstance(got.reasoning, str) and got.reasoning == got.reasoning.strip()
        assert got.finish_reason is None or isinstance(got.finish_reason, str)
        assert isinstance(got.usage, dict) and set(got.usage) == {"prompt_tokens", "completion_tokens"}
        assert all(type(v) is int and v >= 0 for v in got.usage.values()), got.usage
        assert 1 <= pool.calls <= retries + 1
        assert teacher.stats.snapshot() == {"requests": 1, "retries": pool.calls - 1, "failures": 0, **got.usage}
    assert len(sleeps) == pool.calls - 1
    assert all(isinstance(s, float | int) and not math.isnan(s) and 0 <= s <= teacher.max_backoff
               for s in sleeps), sleeps
    return got, pool.calls, sleeps


# ----------------------------------------------------------------------------------- any reply at all
@FUZZ
@given(script=st.lists(st.one_of(http_reply(), http_reply(status=st.just(200)), SHAPED, SHAPED, TRANSPORT),
                      min_size=1, max_size=4),
       retries=st.integers(0, 3))
def test_any_reply_gives_a_typed_reply_or_a_one_line_teacher_error(script, retries):
    _chat_keeps_its_promise(script, retries)


# ------------------------------------------------------------------------------------ retry policy
@FUZZ
@given(code=STATUS, reply=st.data(), retries=st.integers(0, 3))
def test_status_codes_follow_the_retry_policy(code, reply, retries):
    """Every attempt answers the same status, its body framed and encoded right: 429 and 5xx are retried until
    the last retry (a numeric Retry-After is the wait, capped at max_backoff), any other 4xx fails at once, and
    the message says which status came back."""
    wire = reply.draw(http_reply(status=st.just(code), framing=WELL_FRAMED, encoding=WELL_ENCODED))
    got, calls, sleeps = _chat_keeps_its_promise([wire], retries)
    if not isinstance(got, TeacherError) or code < 400:
        return
    if code == 429 or code >= 500:
        assert calls == retries + 1 and f"HTTP {code}" in str(got) and f"gave up after {retries} retries" in str(got)
        header = wire.partition(b"\r\n\r\n")[0].decode("latin-1")
        if "Retry-After: " in header and code == 429:
            value = header.split("Retry-After: ")[1].split("\r\n")[0]
            try:
                wait = min(4.0, max(0.0, float(value)))
            except ValueError:
                wait = None
            assert wait is None or sleeps == [wait] * retries, (value, sleeps)
    else:
        assert calls == 1 and got.retries == 0 and f"HTTP {code}" in str(got) and "not retried" in str(got)


# ------------------------------------------------------------------ what the fuzzing found, as examples
def _ok(body: bytes, code: int = 200, headers: str = "Content-Type: application/json\r\n") -> bytes:
    return b"HTTP/1.1 %d OK\r\n%sContent-Length: %d\r\n\r\n%s" % (code, headers.encode(), len(body), body)


@pytest.mark.parametrize("body, code, reason", [
    (b"[" * 100_000 + b"]" * 100_000, 200, "reply is not JSON: '[[[["),  # was RecursionError from resp.json()
    (b'{"detail": ' * 2000 + b"1" + b"}" * 2000, 503, 'HTTP 503: {"detail": {"detail"'),  # in _server_message
    (b'{"choices": [{"message": {"content": [{"type": "text", "text": "Yes."}]}}]}', 200,  # was AttributeError
     "reply's choices[0].message.content is not a string: [{\"type\": \"text\""),
    (b'{"choices": [{"message": {"content": 7}}]}', 200, "reply's choices[0].message.content is not a string: 7"),
], ids=["deep-json", "deep-json-error-body", "content-parts-list", "content-int"])
def test_replies_that_raised_other_exceptions_are_teacher_errors(body, code, reason):
    teacher, pool = canned_teacher([_ok(body, code)], retries=1, sleeps=[])
    with pytest.raises(TeacherError) as e:
        teacher.chat(MESSAGES, 8)
    assert str(e.value).startswith(f"{URL} {MODEL}: {reason}") and "gave up after 1 retries" in str(e.value)
    assert pool.calls == 2 and "\n" not in str(e.value)


@pytest.mark.parametrize("message, usage, want", [
    # was AttributeError: 'dict' object has no attribute 'strip'; a reasoning field that is not text is ignored
    ({"content": "<think>Likes crime.</think>Yes.", "reasoning_content": {"text": "x"}}, None,
     ("Yes.", "Likes crime.", 0, 0)),
    ({"content": "Yes.", "reasoning_content": 5, "reasoning": "via alias"}, None, ("Yes.", "via alias", 0, 0)),
    # were TypeError, ValueError, OverflowError from int(): a count that is not a number >= 0 counts 0
    ({"content": "Yes."}, {"prompt_tokens": [1], "completion_tokens": "x"}, ("Yes.", "Yes.", 0, 0)),
    ({"content": "Yes."}, {"prompt_tokens": float("inf"), "completion_tokens": float("nan")}, ("Yes.", "Yes.", 0, 0)),
    ({"content": "Yes."}, {"prompt_tokens": -4, "completion_tokens": "12"}, ("Yes.", "Yes.", 0, 12)),
], ids=["reasoning-dict", "reasoning-int-then-alias", "usage-list-and-text", "usage-inf-nan", "usage-negative"])
def test_odd_fields_give_a_typed_reply(message, usage, want):
    body = {"choices": [{"message": message, "finish_reason": ["stop"]}], **({"usage": usage} if usage else {})}
    teacher, _ = canned_teacher([_ok(json.dumps(body).encode())], retries=0, sleeps=[])
    got = teacher.chat(MESSAGES, 8)
    assert (got.content, got.reasoning, got.usage["prompt_tokens"], got.usage["completion_tokens"]) == want
    assert got.finish_reason is None  # was the list ["stop"]
    assert teacher.stats["completion_tokens"] == want[3]


@pytest.mark.parametrize("answer, reason", [
    (_ok(json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}.\nSee the docs.\r\n"}}).encode(), 401),
     "HTTP 401: Incorrect API key provided: <api key>. See the docs.; not retried"),
    (_ok(b"<html>\n<h1>Bad Request</h1>\n</html>", 400, "Content-Type: text/html\r\n"),
     "HTTP 400: <html> <h1>Bad Request</h1> </html>; not retried"),
    (lambda url: SSLError("[SSL: WRONG_VERSION_NUMBER] wrong version number\n(_ssl.c:1006)"),
     "connection error: SSLError: [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006); gave up"),
], ids=["json-error-message", "html-body", "exception-text"])
def test_error_messages_are_one_line(answer, reason):
    """A server's message (or an exception's) with newlines used to go into the TeacherError as it was."""
    teacher, _ = canned_teacher([answer], retries=0, sleeps=[])
    with pytest.raises(TeacherError) as e:
        teacher.chat(MESSAGES, 8)
    assert str(e.value).startswith(f"{URL} {MODEL}: {reason}") and str(e.value).splitlines() == [str(e.value)]
