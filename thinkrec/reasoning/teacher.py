"""Teacher clients: the chat model asked, per training sample, whether a user will like an item; its
reasoning becomes training data.

    teacher = make_teacher("http://127.0.0.1:8000/v1", "Qwen/QwQ-32B")   # vLLM, SGLang, Ollama, llama.cpp, hosted
    teacher = make_teacher("local")                                      # SmolLM2-135M-Instruct, offline
    reply = teacher.chat([{"role": "user", "content": "..."}], max_tokens=1024)
    reply.reasoning, reply.content, reply.usage, teacher.stats.snapshot()

Both teachers return a `Reply` parsed the same way (`parse_reply`):
  content    the answer, with any <think>...</think> block removed.
  reasoning  the server's `reasoning_content` (or `reasoning`; a field that is not a string is ignored), filled
             by vLLM / SGLang reasoning parsers;
             else the text of the <think> block in the content; a content holding "</think>" without the
             opening tag counts too (QwQ and DeepSeek-R1 templates put <think> in the prompt, so the model
             only writes the closing tag); else the answer itself (a model that does not think aloud gives
             its answer as its reasoning). A <think> never closed (cut off by max_tokens) is all reasoning.

`HTTPTeacher` talks to any OpenAI-compatible `POST {base_url}/chat/completions` with `requests`:
synchronous calls from a thread pool (synthesis runs up to 16 at once) give the I/O concurrency a remote
teacher needs without async machinery, and `requests` is already installed (gguf depends on it), so no new
dependency. One `requests.Session` per thread keeps connections alive without sharing a Session across
threads. Transient failures are retried with exponential backoff and full jitter,
uniform(0, min(max_backoff, backoff * 2**attempt)) seconds: HTTP 429 (its Retry-After seconds honoured,
capped at max_backoff), 5xx, timeouts, connection errors, a body that is not JSON, JSON without
choices or message, a message content that is not a string. Any other 4xx (bad request, bad key, wrong
URL or model) cannot get better by waiting and fails at once. API keys (several rotate round-robin, one
per HTTP attempt, so a retry after a 429 goes out under the next key) are never logged and are masked in
every error text, which is one line. Usage counts that are not numbers >= 0 count 0; a finish_reason that
is not a string is None.

`LocalTeacher` runs a transformers model in-process (the embedded default SmolLM2-135M-Instruct, any
Hugging Face id or directory), one call at a time under a lock: a CPU or single GPU gains nothing from
concurrent generate calls. A tokenizer without a chat template (tiny test models, base models) gets a
plain "System: ...\\nUser: ...\\nAssistant:" prompt instead.
"""

import json
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field

import requests

from thinkrec.errors import UsageError, UserError

ERROR_CHARS = 300  # how much of a server's error message goes into a TeacherError


@dataclass
class Reply:
    content: str  # the answer, <think> block removed, stripped
    reasoning: str  # reasoning_content, else the <think> block, else the answer
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    finish_reason: str | None = None


class TeacherError(UserError, RuntimeError):
    """The request failed after the last retry (or at once, for a 4xx other than 429); str(e) says why
    (status and server message, timeout, bad JSON, no choices); e.retries = retries done."""

    def __init__(self, message: str, retries: int = 0):
        super().__init__(message)
        self.retries = retries


class TeacherStats(dict):
    """Counters shared by the threads calling one teacher: requests (chat calls), retries, failures (calls
    that raised TeacherError), prompt_tokens, completion_tokens (of successful calls)."""

    KEYS = ("requests", "retries", "failures", "prompt_tokens", "completion_tokens")

    def __init__(self):
        super().__init__(dict.fromkeys(self.KEYS, 0))
        self._lock = threading.Lock()

    def add(self, **counts) -> None:
        with self._lock:
            for k, v in counts.items():
                self[k] += v

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self)


# ------------------------------------------------------------------------------------- reply parsing
def split_think(text: str) -> tuple:
    """(reasoning or None, answer) of a model's text: the <think> block, or everything before a lone
    "</think>", is the reasoning; the rest is the answer."""
    head, closed, tail = text.partition("</think>")
    if not closed:
        before, opened, inside = text.partition("<think>")
        return (inside.strip(), before.strip()) if opened else (None, text.strip())
    before, opened, inside = head.partition("<think>")
    if opened:
        return inside.strip(), (before + tail).strip()
    return head.strip(), tail.strip()


def _count(value) -> int:
    """A usage count from a server: a non-negative int, 0 for anything that is not a number >= 0."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError, OverflowError):  # a list, "x", NaN, infinity
        return 0


def parse_reply(content: str | None, reasoning_field: str | None = None, usage: dict | None = None,
                finish_reason: str | None = None) -> Reply:
    """A Reply from a message's content and its reasoning_content (either may be None)."""
    think, answer = split_think(content or "")
    reasoning = (reasoning_field if isinstance(reasoning_field, str) else "").strip() or think or answer
    usage = usage if isinstance(usage, dict) else {}
    counts = {k: _count(usage.get(k)) for k in ("prompt_tokens", "completion_tokens")}
    return Reply(content=answer, reasoning=reasoning, usage=counts,
                 finish_reason=finish_reason if isinstance(finish_reason, str) else None)


# ---------------------------------------------------------------------------------------- HTTP teacher
class _Retryable(Exception):
    """A transient failure: `reason` for the final error, `wait` seconds the server asked for (or None)."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason, self.wait = reason, wait


def _server_message(resp) -> str:
    """The server's error text: OpenAI's {"error": {"message": ...}}, {"error": "..."}, {"detail": ...},
    else the raw body; on one line, first ERROR_CHARS characters."""
    try:
        body = resp.json()
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python recurses
        body = None
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return _one_line(str(err))[:ERROR_CHARS]
    return _one_line(resp.text)[:ERROR_CHARS]


def _one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines too) as one space: a server's message, an exception's."""
    return " ".join(text.split())


def _retry_after(resp, cap: float) -> float | None:
    """Retry-After in seconds (capped), or None when absent or an HTTP date (then our backoff applies)."""
    try:
        return min(cap, max(0.0, float(resp.headers.get("Retry-After", ""))))
    except ValueError:
        return None


class HTTPTeacher:
    """A chat model behind an OpenAI-compatible server. `chat` is blocking and thread-safe."""

    def __init__(self, base_url: str, model: str, api_keys: list | None = None, timeout: float = 120.0,
                 retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0, temperature: float = 0.6,
                 seed: int = 0):
        if not base_url.startswith(("http://", "https://")):
            raise UsageError(f"teacher URL {base_url!r} must start with http:// or https://")
        if not (retries >= 0 and math.isfinite(timeout) and timeout > 0):
            raise UsageError(f"teacher retries {retries} must be >= 0 and timeout {timeout} s > 0")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.url = self.base_url + "/chat/completions"
        self.name = f"{self.base_url} {model}"
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.temperature, self.seed = temperature, seed
        self._keys = [k for k in (api_keys or []) if k]
        self._key_turn, self._key_lock = 0, threading.Lock()
        self._local = threading.local()
        self._sleep = time.sleep  # tests make backoff instant
        self.stats = TeacherStats()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _headers(self) -> dict:
        if not self._keys:
            return {}
        with self._key_lock:
            key = self._keys[self._key_turn % len(self._keys)]
            self._key_turn += 1
        return {"Authorization": f"Bearer {key}"}

    def _mask(self, text: str) -> str:
        """`text` with every API key replaced: servers echo bad keys back in their error messages."""
        for key in self._keys:
            text = text.replace(key, "<api key>")
        return text

    def _post(self, body: dict) -> Reply:
        """One HTTP attempt: a Reply, _Retryable for a transient failure, TeacherError for a final one."""
        try:
            resp = self._session().post(self.url, json=body, headers=self._headers(), timeout=self.timeout)
        except requests.Timeout:
            raise _Retryable(f"no reply within the {self.timeout:g} s timeout") from None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {str(e)[:ERROR_CHARS]}") from None
        except requests.RequestException as e:  # a bad URL, too many redirects: waiting will not help
            raise TeacherError(f"request failed: {type(e).__name__}: {str(e)[:ERROR_CHARS]}") from None
        if resp.status_code == 429:
            raise _Retryable(f"HTTP 429 (rate limited): {_server_message(resp)}",
                             _retry_after(resp, self.max_backoff))
        if resp.status_code >= 500:
            raise _Retryable(f"HTTP {resp.status_code}: {_server_message(resp)}")
        if resp.status_code >= 400:
            hint = " (does the URL end with /v1?)" if resp.status_code == 404 else ""
            raise TeacherError(f"HTTP {resp.status_code}{hint}: {_server_message(resp)}; not retried: "
                               f"check the URL, --model and the API key")
        try:
            data = resp.json()
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python recurses
            raise _Retryable(f"reply is not JSON: {resp.text[:100]!r}") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        first = choices[0] if isinstance(choices, list) and choices else None
        message = first.get("message") if isinstance(first, dict) else None
        if not isinstance(message, dict):
            raise _Retryable(f"reply has no choices[0].message: {json.dumps(data)[:ERROR_CHARS]}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise _Retryable(f"reply's choices[0].message.content is not a string: "
                             f"{json.dumps(content)[:ERROR_CHARS]}")
        reasoning = next((r for r in (message.get("reasoning_content"), message.get("reasoning"))
                          if isinstance(r, str) and r), None)
        return parse_reply(content, reasoning, data.get("usage"), first.get("finish_reason"))

    def chat(self, messages: list, max_tokens: int) -> Reply:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": self.temperature, "seed": self.seed}
        self.stats.add(requests=1)
        for attempt in range(self.retries + 1):
            try:
                reply = self._post(body)
            except _Retryable as e:
                if attempt == self.retries:
                    self.stats.add(failures=1)
                    raise TeacherError(_one_line(self._mask(f"{self.name}: {e.reason}; gave up after {attempt} "
                                                            f"retries")), attempt) from None
                self.stats.add(retries=1)
                cap = min(self.max_backoff, self.backoff * 2 ** attempt)
                self._sleep(e.wait if e.wait is not None else random.uniform(0, cap))
            except TeacherError as e:
                self.stats.add(failures=1)
                raise TeacherError(_one_line(self._mask(f"{self.name}: {e}")), attempt) from None
            else:
                self.stats.add(**reply.usage)
                return reply
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------- local teacher
def plain_prompt(messages: list) -> str:
    """The prompt for a tokenizer without a chat template: one "Role: content" line per message."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class LocalTeacher:
    """A transformers causal LM in this process; greedy at temperature 0, else sampled from `seed`."""

    def __init__(self, model: str | None = None, temperature: float = 0.0, seed: int = 0, device="cpu"):
        from thinkrec.model.load import DEFAULT_MODEL, load_llm

        self.lm, self.tok, _ = load_llm(model, device=device)
        self.name = f"local:{model or DEFAULT_MODEL}"
        self.temperature, self.seed, self.device = temperature, seed, device
        self._lock = threading.Lock()
        self._calls = 0
        self.stats = TeacherStats()

    def _prompt_ids(self, messages: list):
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        return self.tok(plain_prompt(messages), return_tensors="pt").input_ids

    def _eos_ids(self) -> set:
        eos = self.lm.generation_config.eos_token_id
        eos = self.tok.eos_token_id if eos is None else eos
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    def _generate(self, ids, max_tokens: int):
        """New token ids [n] (sampling seeded per call, without touching the global RNG state)."""
        import torch

        # Sampling keeps the model's own top_k / top_p (generation_config.json: the authors' settings).
        sample = self.temperature > 0
        options = {"do_sample": sample, "temperature": self.temperature if sample else None,
                   "max_new_tokens": max_tokens, "use_cache": True,  # load_llm turns the cache off for training
                   "eos_token_id": sorted(self._eos_ids()) or None, "pad_token_id": self.tok.pad_token_id}
        on_cuda = str(self.device).startswith("cuda")
        with torch.random.fork_rng(devices=[torch.device(self.device)] if on_cuda else []), torch.no_grad():
            torch.manual_seed(self.seed + self._calls)
            out = self.lm.generate(ids.to(self.device), attention_mask=torch.ones_like(ids).to(self.device),
                                   **options)
        return out[0, ids.shape[1]:].tolist()

    def chat(self, messages: list, max_tokens: int) -> Reply:
        self.stats.add(requests=1)
        with self._lock:
            ids = self._prompt_ids(messages)
            new = self._generate(ids, max_tokens)
            self._calls += 1
        finish = "stop" if new and new[-1] in self._eos_ids() else "length"
        text = self.tok.decode(new, skip_special_tokens=True)
        reply = parse_reply(text, None, {"prompt_tokens": ids.shape[1], "completion_tokens": len(new)}, finish)
        self.stats.add(**reply.usage)
        return reply


# ------------------------------------------------------------------------------------------- factory
def api_keys_from_env(env_var: str = "THINKREC_TEACHER_API_KEYS") -> list:
    """Comma-separated keys from `env_var`, else OPENAI_API_KEY, else none."""
    raw = os.environ.get(env_var) or os.environ.get("OPENAI_API_KEY") or ""
    return [k.strip() for k in raw.split(",") if k.strip()]


def make_teacher(spec: str, model: str | None = None, *, api_key_env: str = "THINKREC_TEACHER_API_KEYS",
                 timeout: float = 120.0, retries: int = 6, temperature: float | None = None, seed: int = 0):
    """"local" / "local:MODEL" -> LocalTeacher (temperature default 0); an http(s) URL of an
    OpenAI-compatible server -> HTTPTeacher (temperature default 0.6, `model` required)."""
    if spec == "local" or spec.startswith("local:"):
        local_model = spec.partition(":")[2] or model
        return LocalTeacher(local_model, temperature=0.0 if temperature is None else temperature, seed=seed)
    if spec.startswith(("http://", "https://")):
        if not model:
            raise UsageError(f"teacher {spec} needs --teacher-model: the model name the server serves "
                             f"(e.g. --teacher-model Qwen/QwQ-32B; GET {spec.rstrip('/')}/models lists them)")
        return HTTPTeacher(spec, model, api_keys_from_env(api_key_env), timeout=timeout, retries=retries,
                           temperature=0.6 if temperature is None else temperature, seed=seed)
    raise UsageError(f"--teacher {spec!r} is not understood: give 'local' (the default SmolLM2-135M-Instruct), "
                     f"'local:MODEL' (a Hugging Face id or model directory) or the http(s):// URL of an "
                     f"OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1)")
