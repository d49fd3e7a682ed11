"""Benchmark the HTTP teacher's I/O concurrency: N chat requests one at a time vs from a thread pool.

    python bench/bench_teacher.py                              # N=64, 200 ms per reply, 16 threads
    python bench/bench_teacher.py --requests 256 --delay 0.05 --concurrency 32

The server is tests/fake_openai.py in this process, answering each request after `--delay` seconds (a
remote teacher's latency; the generation itself is not what is measured), so the ideal times are
N * delay sequentially and ceil(N / concurrency) * delay concurrently, and everything above them is
client + server overhead (HTTP, JSON, threads, the GIL). Providers: `sequential` (HTTPTeacher.chat in a
loop) and `concurrent` (the same calls from a ThreadPoolExecutor, as reasoning synthesis makes them).
The concurrent time is the median of --repeats runs through one pool (its threads, and so their
keep-alive connections, live across runs as in synthesis); the sequential one is one run (N * delay
seconds). Each reply echoes its question and is checked against it before the times are reported.
Prints a table, then one JSON line.
"""

import argparse
import math
import statistics
from concurrent.futures import ThreadPoolExecutor

from _util import Stopwatch, print_json

from tests.fake_openai import FakeOpenAI, reply
from thinkrec.reasoning.teacher import HTTPTeacher


def run(teacher: HTTPTeacher, n: int, pool: ThreadPoolExecutor | None, tag: str) -> float:
    """Wall seconds for n chats from `pool`'s threads (None: a plain loop); replies checked."""
    questions = [f"{tag} question {i}" for i in range(n)]

    def ask(q):
        return teacher.chat([{"role": "user", "content": q}], max_tokens=16).content

    clock = Stopwatch()
    answers = [ask(q) for q in questions] if pool is None else list(pool.map(ask, questions))
    seconds = clock.wall()
    wrong = [(q, a) for q, a in zip(questions, answers) if a != f"echo {q}"]
    if wrong:
        raise AssertionError(f"{len(wrong)} replies do not match their questions, e.g. {wrong[0]}")
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64, help="chat requests per provider")
    ap.add_argument("--delay", type=float, default=0.2, help="seconds the fake server waits before each reply")
    ap.add_argument("--concurrency", type=int, default=16, help="threads of the concurrent provider")
    ap.add_argument("--repeats", type=int, default=5, help="runs of the concurrent provider (median reported)")
    args = ap.parse_args()

    def handler(request, k):
        return reply(f"echo {request['messages'][-1]['content']}", delay=args.delay,
                     usage={"prompt_tokens": 20, "completion_tokens": 5})

    n, c = args.requests, args.concurrency
    with FakeOpenAI(handler) as srv:
        teacher = HTTPTeacher(srv.url, "fake-model", timeout=30.0)
        seq = run(teacher, n, None, "sequential")
        with ThreadPoolExecutor(c) as pool:
            con = statistics.median(run(teacher, n, pool, f"concurrent {r}") for r in range(args.repeats))
    stats = teacher.stats.snapshot()
    assert stats["requests"] == (1 + args.repeats) * n and stats["retries"] == stats["failures"] == 0, stats

    ideal_seq, ideal_con = n * args.delay, math.ceil(n / c) * args.delay
    print(f"{n} requests, {args.delay * 1000:.0f} ms per reply, concurrent: median of {args.repeats}\n")
    print("| provider   | threads | seconds | ideal s | overhead ms/request |")
    print("|------------|--------:|--------:|--------:|--------------------:|")
    for name, threads, s, ideal in (("sequential", 1, seq, ideal_seq), ("concurrent", c, con, ideal_con)):
        print(f"| {name:<10} | {threads:>7} | {s:>7.2f} | {ideal:>7.2f} | {(s - ideal) * 1000 / n:>19.2f} |")
    print(f"\nspeedup {seq / con:.1f}x (ideal {ideal_seq / ideal_con:.1f}x)\n")
    print_json({"bench": "teacher", "requests": n, "delay_s": args.delay, "seconds_sequential": round(seq, 3),
                "seconds_concurrent": round(con, 3), "concurrency": c, "repeats": args.repeats, "speedup": round(seq / con, 2),
                "ideal_speedup": round(ideal_seq / ideal_con, 2)})


if __name__ == "__main__":
    main()
