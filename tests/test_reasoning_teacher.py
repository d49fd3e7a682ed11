"""Teacher clients (thinkrec/reasoning/teacher.py) against the fake OpenAI server (tests/fake_openai.py) and a
tiny local model: reply parsing, retries and backoff, giving up, keys, thread safety, the spec parser.
Backoff sleeps are recorded instead of slept, so every test runs in well under a second or two."""

import threading

import pytest

from tests.fake_openai import FakeOpenAI, garbage, hang, no_choices, reply, status
from thinkrec.reasoning.teacher import (HTTPTeacher, LocalTeacher, Reply, TeacherError, make_teacher,
                                        parse_reply)

MESSAGES = [{"role": "system", "content": "You judge movies."}, {"role": "user", "content": "Heat (1995)?"}]


def fast_teacher(url, sleeps=None, **kw) -> HTTPTeacher:
    """An HTTPTeacher whose backoff sleeps are appended to `sleeps` (or dropped) instead of slept."""
    teacher = HTTPTeacher(url, "fake-model", **kw)
    teacher._sleep = sleeps.append if sleeps is not None else (lambda seconds: None)
    return teacher


def sequence(*responses):
    """A handler answering call k with responses[k]."""
    return lambda request, k: responses[k]


# ------------------------------------------------------------------------------------------- parsing
def test_reasoning_content_taken_and_request_body():
    usage = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    with FakeOpenAI(sequence(reply(" Yes. ", reasoning=" Likes crime films. ", usage=usage))) as srv:
        teacher = fast_teacher(srv.url + "/", temperature=0.7, seed=3)
        got = teacher.chat(MESSAGES, max_tokens=64)
    assert got == Reply("Yes.", "Likes crime films.", {"prompt_tokens": 12, "completion_tokens": 5}, "stop")
    assert srv.requests[0]["json"] == {"model": "fake-model", "messages": MESSAGES, "max_tokens": 64,
                                       "temperature": 0.7, "seed": 3}
    assert "Authorization" not in srv.requests[0]["headers"]
    assert teacher.stats.snapshot() == {"requests": 1, "retries": 0, "failures": 0, "prompt_tokens": 12,
                                        "completion_tokens": 5}


@pytest.mark.parametrize("content, reasoning, answer", [
    ("<think>\nLikes Pacino.\n</think>\n\nYes.", "Likes Pacino.", "Yes."),   # full block
    ("Likes Pacino.\n</think>\n\nYes.", "Likes Pacino.", "Yes."),            # QwQ / R1: opening tag in the prompt
    ("Yes.", "Yes.", "Yes."),                                                # no reasoning: the answer is it
    ("<think>\n\n</think>\n\nYes.", "Yes.", "Yes."),                         # empty block (thinking off)
    ("<think>Likes Pacino, but", "Likes Pacino, but", ""),                   # cut off by max_tokens
])
def test_think_blocks(content, reasoning, answer):
    got = parse_reply(content)
    assert (got.reasoning, got.content) == (reasoning, answer)
    assert got.usage == {"prompt_tokens": 0, "completion_tokens": 0}


def test_think_block_through_server_and_reasoning_alias():
    body = b'{"choices": [{"message": {"content": "x", "reasoning": "via alias"}, "finish_reason": "length"}]}'
    with FakeOpenAI(sequence(reply("Hmm.\n</think>\nNo."), status(200, body=body))) as srv:
        teacher = fast_teacher(srv.url)
        first, second = teacher.chat(MESSAGES, 8), teacher.chat(MESSAGES, 8)
    assert (first.reasoning, first.content) == ("Hmm.", "No.")
    assert (second.reasoning, second.content, second.finish_reason) == ("via alias", "x", "length")


# ------------------------------------------------------------------------------------------- retries
def test_retries_every_transient_failure_then_succeeds():
    sleeps = []
    handler = sequence(status(500), status(429, {"Retry-After": "0.25"}), hang(2), garbage(), no_choices(),
                       status(429, {"Retry-After": "3600"}), reply("Yes."))
    with FakeOpenAI(handler) as srv:
        teacher = fast_teacher(srv.url, sleeps, timeout=0.5, backoff=0.1, max_backoff=5.0)
        assert teacher.chat(MESSAGES, 8).content == "Yes."
    assert len(srv.requests) == 7
    assert sleeps[1] == 0.25 and sleeps[5] == 5.0  # Retry-After honoured, capped at max_backoff
    for attempt in (0, 2, 3, 4):  # full jitter in [0, backoff * 2**attempt]
        assert 0 <= sleeps[attempt] <= 0.1 * 2 ** attempt
    assert teacher.stats.snapshot()["retries"] == 6 and teacher.stats["failures"] == 0


@pytest.mark.parametrize("response, reason", [
    (status(503), "HTTP 503: fake error 503"),
    (garbage(), "reply is not JSON: '<html>502 Bad Gateway</html>'"),
    (no_choices(), "reply has no choices[0].message"),
])
def test_gives_up_after_the_last_retry(response, reason):
    with FakeOpenAI(lambda request, k: response) as srv:
        teacher = fast_teacher(srv.url, retries=3)
        with pytest.raises(TeacherError, match="gave up after 3 retries") as e:
            teacher.chat(MESSAGES, 8)
    assert reason in str(e.value) and e.value.retries == 3 and len(srv.requests) == 4
    assert teacher.stats.snapshot() == {"requests": 1, "retries": 3, "failures": 1, "prompt_tokens": 0,
                                        "completion_tokens": 0}


def test_connection_refused_is_retried_then_reported():
    with FakeOpenAI(sequence()) as srv:
        url = srv.url  # the port is closed once the server has gone
    with pytest.raises(TeacherError, match="connection error.*gave up after 2 retries") as e:
        fast_teacher(url, retries=2).chat(MESSAGES, 8)
    assert e.value.retries == 2


def test_client_errors_are_not_retried_and_keys_stay_secret(monkeypatch):
    monkeypatch.setenv("THINKREC_TEACHER_API_KEYS", "sk-secret-1")
    body = {"error": {"message": "Incorrect API key provided: sk-secret-1. " + "x" * 500}}
    with FakeOpenAI(sequence(status(500), status(401, body=body))) as srv:
        teacher = make_teacher(srv.url, "fake-model")
        teacher._sleep = lambda seconds: None
        with pytest.raises(TeacherError, match="HTTP 401: Incorrect API key provided") as e:
            teacher.chat(MESSAGES, 8)
    assert len(srv.requests) == 2 and e.value.retries == 1
    assert "sk-secret-1" not in str(e.value) and "sk-secret-1" not in teacher.name
    assert "x" * 300 not in str(e.value)  # the server's message is cut at 300 characters
    assert teacher.name == f"{srv.url} fake-model"


def test_wrong_path_says_so():
    with FakeOpenAI(sequence()) as srv, pytest.raises(TeacherError, match=r"HTTP 404 \(does the URL end with /v1") as e:
        fast_teacher(srv.url[:-len("/v1")]).chat(MESSAGES, 8)
    assert e.value.retries == 0


# ------------------------------------------------------------------------------------ keys, threads
def test_keys_rotate_round_robin(monkeypatch):
    monkeypatch.setenv("THINKREC_TEACHER_API_KEYS", " sk-a, sk-b ,")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused")
    with FakeOpenAI(lambda request, k: status(429, {"Retry-After": "0"}) if k == 1 else reply("Yes.")) as srv:
        teacher = make_teacher(srv.url, "fake-model")
        for _ in range(3):
            teacher.chat(MESSAGES, 8)
    auth = [r["headers"]["Authorization"] for r in srv.requests]
    assert auth == ["Bearer sk-a", "Bearer sk-b", "Bearer sk-a", "Bearer sk-b"]  # the 429's retry: next key


def test_openai_api_key_is_the_fallback(monkeypatch):
    monkeypatch.delenv("THINKREC_TEACHER_API_KEYS", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-only")
    with FakeOpenAI(sequence(reply("Yes."))) as srv:
        make_teacher(srv.url, "fake-model").chat(MESSAGES, 8)
    assert srv.requests[0]["headers"]["Authorization"] == "Bearer sk-only"


def test_sixteen_threads_get_their_own_replies_and_exact_counts():
    def handler(request, k):  # every 7th call fails once; replies echo the question
        if k % 7 == 3:
            return status(500)
        return reply(f"echo {request['messages'][-1]['content']}", usage={"prompt_tokens": 10, "completion_tokens": 3})

    with FakeOpenAI(handler) as srv:
        teacher = fast_teacher(srv.url)
        wrong = []

        def worker(t):
            for c in range(4):
                question = f"thread {t} call {c}"
                got = teacher.chat([{"role": "user", "content": question}], 8)
                if got.content != f"echo {question}":
                    wrong.append((question, got.content))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    failed_calls = sum(k % 7 == 3 for k in range(len(srv.requests)))
    assert wrong == [] and len(srv.requests) == 64 + failed_calls
    assert teacher.stats.snapshot() == {"requests": 64, "retries": failed_calls, "failures": 0,
                                        "prompt_tokens": 640, "completion_tokens": 192}


# ------------------------------------------------------------------------------------------- factory
@pytest.mark.parametrize("spec, model, match", [
    ("http://127.0.0.1:8000/v1", None, "needs --teacher-model"),
    ("127.0.0.1:8000/v1", "m", "'local'.*http"),
    ("gpt-4o", None, "is not understood"),
    ("ftp://host/v1", "m", "is not understood"),
])
def test_make_teacher_rejects(spec, model, match):
    with pytest.raises(ValueError, match=match):
        make_teacher(spec, model)


def test_make_teacher_http_defaults(monkeypatch):
    monkeypatch.delenv("THINKREC_TEACHER_API_KEYS", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    teacher = make_teacher("https://api.example.com/v1/", "m", timeout=5.0, retries=2)
    assert teacher.name == "https://api.example.com/v1 m"
    assert teacher.url == "https://api.example.com/v1/chat/completions"
    assert (teacher.temperature, teacher.timeout, teacher.retries, teacher._keys) == (0.6, 5.0, 2, [])


# --------------------------------------------------------------------------------------- local teacher
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """tests/tiny_llama.py's random Llama and BPE tokenizer saved as a model directory (no chat template)."""
    from tests.tiny_llama import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-teacher")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_local_teacher_is_deterministic_at_temperature_zero(tiny_model_dir):
    import torch

    teacher = make_teacher(f"local:{tiny_model_dir}")
    assert isinstance(teacher, LocalTeacher) and teacher.name == f"local:{tiny_model_dir}"
    assert not teacher.tok.chat_template  # so the plain "User: ...\nAssistant:" prompt is used
    rng = torch.get_rng_state()
    first, second = teacher.chat(MESSAGES, max_tokens=6), teacher.chat(MESSAGES, max_tokens=6)
    assert first == second and first.reasoning  # a model that does not think: the answer is the reasoning
    assert first.usage["prompt_tokens"] > 0 and 0 < first.usage["completion_tokens"] <= 6
    assert first.finish_reason in ("stop", "length")
    assert torch.equal(rng, torch.get_rng_state())
    assert teacher.stats.snapshot()["requests"] == 2
    assert teacher.stats["completion_tokens"] == 2 * first.usage["completion_tokens"]


def test_local_teacher_sampling_follows_the_seed_and_uses_a_chat_template(tiny_model_dir):
    a, b = (LocalTeacher(str(tiny_model_dir), temperature=1.0, seed=7) for _ in range(2))
    assert a.chat(MESSAGES, 6) == b.chat(MESSAGES, 6)
    a.tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}[assistant]{% endif %}")
    assert a.tok.decode(a._prompt_ids(MESSAGES)[0]) == "[system] You judge movies.\n[user] Heat (1995)?\n[assistant]"
