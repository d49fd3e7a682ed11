"""Generated command lines for every CLI: flags drawn from each CLI's own argument parser, values generated
(numbers out of range, NaN, text, paths that do not exist or are files). The promise under test: a command line
either runs, ends in argparse's usage error (exit 2), or raises our user-error type with a one-line message;
never another exception.

What runs for real: `python -m thinkrec.data` (prepare, prompt), `python -m thinkrec.experts`, `python -m
thinkrec.cf train` (at most 2 epochs), `python -m thinkrec.reasoning synth` and `keywords` with the offline
teachers (facts; tfidf, genres) or an unreachable server, and the headline's file reader, all on a tiny dataset. What stops at the work: train.py
(after its checks, the run lock, the recorded config and the precision choice), infer.py (on a tiny trained run:
after loading it and reading its rows or candidates, at scoring, ranking or explaining), `python -m
thinkrec.export` (at exporting) and `python -m thinkrec.experiments` (at the studies): their long work is not a
question of the command line, and its inputs are fuzzed in test_fuzz_inputs.py and test_fuzz_artifacts.py.

CI draws the same examples every run; THINKREC_FUZZ_EXAMPLES=N draws N fresh ones per property, and the
number tried per CLI is printed at the end of the module.
"""

import argparse
import os
import shutil
from unittest import mock

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzzing import count_report, fuzz_settings  # noqa: E402

from tests.test_train_cli import _tiny_csv  # noqa: E402
from thinkrec.errors import USER_ERRORS  # noqa: E402

FUZZ = fuzz_settings(60)
TRIED = {}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::RuntimeWarning")


_report_counts = count_report(TRIED, "no traceback")


class Reached(Exception):
    """The command line passed every check and the long work would start here."""


class _Captured(Exception):
    pass


def parser_of(main, argv=()) -> argparse.ArgumentParser:
    """The argument parser a CLI's main builds (caught at its parse_args call)."""
    def grab(self, args=None, namespace=None):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        try:
            main(list(argv))
        except _Captured as c:
            return c.args[0]
    raise AssertionError(f"{main} parsed nothing")


# ------------------------------------------------------------------------------------------- values
NUMBERS = ["0", "1", "2", "3", "-1", "-2", "0.5", "-0.5", "1e-9", "nan", "inf", "-inf", "1e400", "0x10", "1_0",
           " 1", "99"]
TEXT = ["", " ", "x", "auto", "all", "none", "None", "official", "ours", "csv", "stage1", "stage2=5", "stage9=1",
        "stage2=-1,stage3=x", "a=b", ",", "=", "-", "--", "é", "😀", "a" * 300, "1,2", "0,1,2", "http://127.0.0.1:9/v1",
        "local:/nonexistent", "facts", "mf", "lightgcn"]


def flag_value(draw, action, paths: list, plausible: bool):
    """One generated value for `action`. Plausible: one of its choices, a number for a typed flag, a path or a
    word for the others (most reach the work); else anything: numbers, text, paths, generated text."""
    if plausible:
        if action.choices:
            return str(draw(st.sampled_from(sorted(action.choices, key=str))))
        if action.type not in (None, str):
            return draw(st.sampled_from(["0", "1", "2", "3", "-1", "0.5", "1e-3", "nan", "inf", "99"]))
        return draw(st.sampled_from(paths + TEXT[:12]))
    pools = [st.sampled_from(NUMBERS), st.sampled_from(TEXT), st.sampled_from(paths),
             st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8)]
    if action.choices:
        pools = [st.sampled_from(sorted(action.choices, key=str))] * 3 + pools
    return str(draw(st.one_of(*pools)))


@st.composite
def command_line(draw, parser, fixed: dict, paths: list, skip=()):
    """argv for `parser`: a subcommand if it has them, some of its flags with generated values, `fixed` flags
    (flag -> strategy of values) always present."""
    argv, plausible = [], draw(st.booleans())
    sub = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if sub:
        name = draw(st.sampled_from(sorted(sub[0].choices)))
        argv.append(name)
        parser = sub[0].choices[name]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"
               and not set(a.option_strings) & set(fixed) and not set(a.option_strings) & set(skip)]
    for a in draw(st.lists(st.sampled_from(options), max_size=6, unique_by=id)) if options else []:
        argv.append(draw(st.sampled_from(a.option_strings)))
        if a.nargs != 0:
            argv.append(flag_value(draw, a, paths, plausible))
    for flag, values in fixed.items():
        if flag in {s for a in parser._actions for s in a.option_strings}:
            argv += [flag, draw(values)]
    positional = [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
                  and a.dest != "help"]
    for a in positional:
        argv += [flag_value(draw, a, paths, plausible) for _ in range(draw(st.integers(1, 2)))]
    return argv


def _offline_hub(repo_id, **_):
    """The Hub as it answers without a network: the id is checked, then nothing is cached."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    raise LocalEntryNotFoundError(f"{repo_id}: offline (test)")


def keeps_the_promise(main, argv, stop=()) -> str:
    """Run main(argv) with the functions `stop` names ([(module, name)]) raising Reached; returns the outcome. A
    usage error (argparse's exit 2), a user error with a one-line message, or running through are the promise;
    anything else fails."""
    import contextlib

    import huggingface_hub

    with contextlib.ExitStack() as patches:
        for module, name in stop:
            patches.enter_context(mock.patch.object(module, name, side_effect=Reached))
        patches.enter_context(mock.patch.object(huggingface_hub, "snapshot_download", _offline_hub))
        try:
            main(argv)
        except Reached:
            return "reached"
        except SystemExit as e:
            assert e.code in (0, 2), f"{argv}: exit {e.code}"
            return f"exit {e.code}"
        except USER_ERRORS as e:
            msg = str(e)
            assert msg.strip() and "Traceback" not in msg, f"{argv}: {type(e).__name__}: {msg!r}"
            return "user error"
    return "ran"


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny csv dataset, a run with its prepared data, CF model and expert groups (seconds on a CPU)."""
    from thinkrec.cf.__main__ import main as cf_main
    from thinkrec.data import prepare
    from thinkrec.experts.__main__ import main as experts_main

    base = tmp_path_factory.mktemp("cli")
    (base / "data").mkdir()
    data, run = _tiny_csv(base / "data"), base / "run"
    prepare("csv", data_dir=data, out=run, quiet=True)
    cf_main(["train", "--run-dir", str(run), "--cf-model", "mf", "--lr", "1e-2", "--dim", "8", "--weight-decay", "1e-4",
             "--max-epochs", "3", "--no-progress"])
    experts_main(["--run-dir", str(run), "--groups", "2"])
    (base / "file.txt").write_text("not a directory\n")
    return {"base": base, "data": data, "run": run,
            "paths": [str(base / "missing"), str(base / "file.txt"), str(data), str(run), str(base / "new")]}


def _fresh_run(tiny, run=None) -> str:
    """A copy of the tiny run (or of `run`) for one example (the CLIs write into it)."""
    import tempfile

    dest = tempfile.mkdtemp(dir=tiny["base"], prefix="ex-")
    shutil.copytree(run or tiny["run"], dest, dirs_exist_ok=True)
    return dest


def _run_dir_values(tiny):
    return st.sampled_from(["FRESH"] * 4 + tiny["paths"])


def _check(name, main, argv, tiny, stop=(), run=None):
    argv = [_fresh_run(tiny, run) if a == "FRESH" else a for a in argv]
    old = os.getcwd()
    os.chdir(tiny["base"])  # relative paths (runs/<dataset>, ...) land in the test's directory
    try:
        outcome = keeps_the_promise(main, argv, stop)
        counts = TRIED.setdefault(name, {})
        counts[outcome] = counts.get(outcome, 0) + 1
    finally:
        os.chdir(old)


# ------------------------------------------------------------------------------------------- the CLIs
def test_train_cli_args(tiny):
    import train

    parser = parser_of(train.main)
    stop = [(train, "run_pipeline")]

    @FUZZ
    @given(argv=command_line(parser, {"--run-dir": _run_dir_values(tiny)}, tiny["paths"]))
    def prop(argv):
        _check("train.py", train.main, argv, tiny, stop)

    prop()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished train.py run on the tiny model and dataset."""
    from tests.test_train_cli import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("trained"))


def test_infer_cli_args(tiny, trained):
    import infer
    import thinkrec.infer.explain as explain
    import thinkrec.infer.rank as rank

    parser = parser_of(infer.main)
    stop = [(infer, "score_rows"), (rank, "rank_items"), (explain, "explain_cli")]
    (tiny["base"] / "candidates.txt").write_text("3\n4\n\n5\n")  # raw item ids of the tiny data
    (tiny["base"] / "rows.jsonl").write_text('{"user_id": "1", "item_id": "3"}\n{"user_id": "2", "item_id": "4"}\n')
    paths = tiny["paths"] + [str(tiny["base"] / "candidates.txt"), str(tiny["base"] / "rows.jsonl")]

    @FUZZ
    @given(argv=command_line(parser, {"--run-dir": _run_dir_values(tiny)}, paths))
    def prop(argv):
        _check("infer.py", infer.main, argv, tiny, stop, run=trained)

    prop()


def test_export_cli_args(tiny, trained):
    import thinkrec.export as export

    parser = parser_of(export.main, ["aoti", "--run-dir", "r", "--out", "o"])

    @FUZZ
    @given(argv=command_line(parser, {"--run-dir": _run_dir_values(tiny), "--out": st.sampled_from(tiny["paths"])},
                             tiny["paths"]))
    def prop(argv):
        _check("python -m thinkrec.export", export.main, argv, tiny, [(export, "export_aoti")], run=trained)

    prop()


def test_data_cli_args(tiny):
    from thinkrec.data.__main__ import main

    parser = parser_of(main, ["prepare"])

    @FUZZ
    @given(argv=command_line(parser, {"--run-dir": _run_dir_values(tiny),
                                      "--data-dir": st.sampled_from(tiny["paths"])}, tiny["paths"],
                             skip=("--mirror",)))  # --mirror grouplens downloads
    def prop(argv):
        _check("python -m thinkrec.data", main, argv, tiny)

    prop()


def test_experts_cli_args(tiny):
    from thinkrec.experts.__main__ import main

    parser = parser_of(main)

    @FUZZ
    @given(argv=command_line(parser, {"--run-dir": _run_dir_values(tiny)}, tiny["paths"]))
    def prop(argv):
        _check("python -m thinkrec.experts", main, argv, tiny)

    prop()


def test_cf_cli_args(tiny):
    import thinkrec.cf.__main__ as cf

    parser = parser_of(cf.main, ["train"])

    @FUZZ
    @given(argv=command_line(parser, {"--run-dir": _run_dir_values(tiny), "--cf-model": st.sampled_from(cf.MODELS),
                                      "--max-epochs": st.sampled_from(["1", "2", "0", "x"]),
                                      "--grid": st.sampled_from(["sasrec", "mf", "x"])},
                             tiny["paths"]))
    def prop(argv):
        _check("python -m thinkrec.cf", cf.main, argv, tiny)

    prop()


def test_synth_cli_args(tiny):
    import thinkrec.reasoning.__main__ as reasoning

    parser = parser_of(reasoning.synth_main)
    teachers = st.sampled_from(["facts", "facts", "http://127.0.0.1:9/v1", "nonsense", "", "ftp://x"])

    @FUZZ
    @given(argv=command_line(parser, {"--run-dir": _run_dir_values(tiny), "--teacher": teachers,
                                      "--retries": st.sampled_from(["1", "1", "2", "0"]),
                                      "--timeout": st.sampled_from(["0.2", "0.2", "0", "-1", "nan"]),
                                      "--n": st.sampled_from(["0", "2", "3", "-1"])}, tiny["paths"],
                             skip=("--dataset", "--data-dir")))
    def prop(argv):
        with mock.patch("time.sleep"):  # retries back off without waiting
            _check("python -m thinkrec.reasoning synth", reasoning.synth_main, argv, tiny)

    prop()


def test_keywords_cli_args(tiny):
    from thinkrec.reasoning.keywords import keywords_main

    parser = parser_of(keywords_main, ["--teacher", "tfidf"])
    teachers = st.sampled_from(["tfidf", "genres", "http://127.0.0.1:9/v1", "nonsense", ""])

    @FUZZ
    @given(argv=command_line(parser, {"--run-dir": _run_dir_values(tiny), "--teacher": teachers}, tiny["paths"],
                             skip=("--dataset", "--data-dir")))
    def prop(argv):
        with mock.patch("time.sleep"):
            _check("python -m thinkrec.reasoning keywords", keywords_main, argv, tiny)

    prop()


def test_experiments_cli_args(tiny):
    import thinkrec.experiments.__main__ as experiments
    import thinkrec.experiments.headline as headline
    import thinkrec.experiments.studies as studies

    parser = parser_of(experiments.main, ["table2"])

    @FUZZ
    @given(argv=command_line(parser, {"--runs": st.sampled_from(tiny["paths"])}, tiny["paths"]))
    def prop(argv):
        with mock.patch.object(headline, "run", side_effect=Reached):
            _check("python -m thinkrec.experiments", experiments.main, argv, tiny, [(studies, "run")])

    prop()


def test_headline_cli_args(tiny):
    from thinkrec.experiments.headline import main

    parser = parser_of(main, ["x@0=y", "--results", "r"])
    specs = [f"{label}@{seed}={path}" for label in ("A", "") for seed in ("0", "x") for path in tiny["paths"]]

    @FUZZ
    @given(argv=command_line(parser, {"--results": st.sampled_from(tiny["paths"])}, tiny["paths"] + specs))
    def prop(argv):
        _check("python -m thinkrec.experiments.headline", main, argv, tiny)

    prop()
