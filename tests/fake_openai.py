"""A fake OpenAI-compatible chat server for tests and benches: standard library only, no network.

    def handler(request_json, call_index):        # the test decides what each call gets
        return reply("Yes") if call_index else status(500)

    with FakeOpenAI(handler) as srv:
        HTTPTeacher(srv.url, "fake").chat(...)      # srv.url = "http://127.0.0.1:PORT/v1"
        srv.requests[0]["json"]["messages"], srv.requests[1]["headers"]["Authorization"]

`call_index` counts the POSTs to /v1/chat/completions in arrival order (0, 1, ...); `requests` records
each one's JSON body and headers. A handler that raises answers HTTP 599 and the exception is re-raised
when the `with` block ends, so a broken test handler cannot pass as a retry. HTTP/1.1 keep-alive, like a
real server; delays (`reply(delay=)`, `hang`) end early when the server closes, so `__exit__` never waits.
"""

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Response:
    code: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering


def reply(content, reasoning=None, usage=None, delay=0.0, finish_reason="stop") -> Response:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    body = {"id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}]}
    if usage is not None:
        body["usage"] = usage
    return Response(body=json.dumps(body).encode(), delay=delay)


def status(code, headers=None, body=None) -> Response:
    body = {"error": {"message": f"fake error {code}", "code": code}} if body is None else body
    return Response(code, body if isinstance(body, bytes) else json.dumps(body).encode(), headers or {})


def garbage() -> Response:
    return Response(body=b"<html>502 Bad Gateway</html>")


def no_choices() -> Response:
    return Response(body=json.dumps({"id": "chatcmpl-fake", "object": "chat.completion", "choices": []}).encode())


def hang(seconds) -> Response:
    return reply("too late", delay=seconds)


class FakeOpenAI:
    def __init__(self, handler):
        self.handler = handler
        self.requests, self.errors = [], []
        self._lock, self._closing = threading.Lock(), threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._request_handler())
        self._server.daemon_threads = True
        self._server.block_on_close = False  # a handler still in hang() must not hold up __exit__
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _respond(self, body: bytes, headers: dict) -> Response:
        """Record the request, give it its call index and ask the test's handler."""
        try:
            request = json.loads(body)
            with self._lock:
                index = len(self.requests)
                self.requests.append({"json": request, "headers": headers})
            return self.handler(request, index)
        except Exception as e:  # noqa: BLE001 -- re-raised in the test's thread by __exit__
            with self._lock:
                self.errors.append(e)
            return Response(599, repr(e).encode())

    def _request_handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes; with Nagle on, the body waits for the client's
            # delayed ACK of the headers: +40 ms a request (measured 47 ms/request sequentially)
            disable_nagle_algorithm = True

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    resp = status(404, body={"error": {"message": f"no route {self.path}"}})
                else:
                    resp = fake._respond(body, dict(self.headers))
                if resp.delay and fake._closing.wait(resp.delay):
                    self.close_connection = True
                    return
                try:
                    self.send_response(resp.code)
                    for k, v in {"Content-Type": "application/json", **resp.headers}.items():
                        self.send_header(k, str(v))
                    self.send_header("Content-Length", str(len(resp.body)))
                    self.end_headers()
                    self.wfile.write(resp.body)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    self.close_connection = True

            def log_message(self, *args):
                pass

        return Handler

    def __enter__(self):
        # serve_forever checks for shutdown every poll interval (0.5 s by default): 20 ms keeps __exit__ quick
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def __exit__(self, exc_type, *exc):
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        if self.errors and exc_type is None:
            raise self.errors[0]
