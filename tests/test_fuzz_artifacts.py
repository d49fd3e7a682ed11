"""Generated damage to the artifacts a run reads back: safetensors (adapters, checkpoint, CF model, expert
groups), JSON markers (RUN/config.json, metrics.json, precision.json, recipe.json, stage adapters.json, the
checkpoint's ckpt.json, data/stats.json and users.json), JSON Lines (reasoning traces as the synthesis resumes
and as train.py reads them, data/items.jsonl) and the prepared interactions.npz. Each artifact is written once by the project's own writer, then per example truncated, bit-flipped,
emptied, or replaced (by random bytes, by another valid file of the same format, or, for JSON, by the same object
with a field dropped or changed), and read back by the reader a run uses.

The promise under test: the reader either
  - returns a correct result: exactly what the damaged bytes encode, read as strictly as the format allows
    (a JSON reader returns the file's JSON value; a JSON Lines reader the values of its complete lines, for
    AppendLog those before the last newline; a safetensors reader each tensor's name, dtype, shape and bytes as
    the header and buffer give them, a model or optimizer loaded from one the same shapes and values; an npz
    reader arrays whose zip CRCs hold), never a partial, stale or repaired value, and fitting what the reader
    promises its callers (a CF export's float32 [users, D] tables, expert groups' matching shapes, prepared data
    whose indices point into its users and items, AdamW state of its parameters' shapes). The formats carry no
    checksum of their own, so a flip inside a tensor's bytes or a JSON number is such a valid file with other
    content; a file left byte-for-byte intact must read back as written; or
  - raises the project's user-error type (thinkrec.errors.UserError) in one line that names the damaged file
    and contains the reader's hint of what to delete or redo;
never another exception (json, UnicodeDecodeError, KeyError, safetensors, torch, numpy, zipfile).

Below the properties: every artifact read back intact, generated JSON Lines rows read back as written, and each
bug this fuzzing found as a plain example (with the exception it raised before its fix).

CI runs each property with a fixed seed and a bounded number of examples; THINKREC_FUZZ_EXAMPLES=N runs N per
property (a long run), and the number of examples tried per artifact kind is printed at the end of the module.
"""

import io
import json
import math
import struct
import zipfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzzing import count_report, fuzz_settings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from thinkrec import precision, recipe  # noqa: E402
from thinkrec.errors import USER_ERRORS, UserError  # noqa: E402
from thinkrec.io import AppendLog, ArtifactError, atomic_write_bytes, write_json  # noqa: E402

FUZZ = fuzz_settings(120)
TRIED = {"safetensors": 0, "json": 0, "jsonl": 0, "npz": 0}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


_report_counts = count_report(TRIED, "no traceback, no wrong result")


# ------------------------------------------------------------------------------------ reference decoders
def strict_json(data: bytes):
    """(True, value) when `data` is UTF-8 JSON, else (False, None): what read_json's result must be."""
    try:
        return True, json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return False, None


def same(a, b) -> bool:
    """Equal JSON values, NaN equal to NaN and 1 not equal to 1.0 (a reader must not change a value's type)."""
    return json.dumps(a, allow_nan=True) == json.dumps(b, allow_nan=True)


ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def safetensors_of(data: bytes):
    """{name: (dtype, shape, raw bytes)} and the metadata of a safetensors file, decoded leniently from its
    header (u64 length, JSON) and buffer; None when even that fails. Whatever a reader returns must match it."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n].decode("utf-8"))
        buf = data[8 + n:]
        meta = header.pop("__metadata__", None) or {}
        out = {}
        for name, t in header.items():
            begin, end = t["data_offsets"]
            out[name] = (t["dtype"], tuple(t["shape"]), buf[begin:end])
        return out, meta
    except Exception:  # noqa: BLE001 - any failure: not decodable
        return None


def tensor_key(t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    return ST_DTYPES[t.dtype], tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_tensors_are(tensors: dict, data: bytes, prefix: str = "") -> None:
    """`tensors` ({name: tensor}) are exactly the tensors (names starting with `prefix`) `data` encodes."""
    ref = safetensors_of(data)
    assert ref is not None, "the reader returned tensors of a file that does not decode"
    want = {k[len(prefix):]: v for k, v in ref[0].items() if k.startswith(prefix)}
    assert sorted(tensors) == sorted(want), (sorted(tensors), sorted(want))
    for k, t in tensors.items():
        assert tensor_key(t) == want[k], k


def npz_of(data: bytes, why: list | None = None):
    """{name: array} of an .npz, every member read whole (zip CRCs checked), or None (the reason put in `why`)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            out = {}
            for info in z.infolist():
                raw = z.read(info)  # checks the CRC
                arr = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
                out[info.filename.removesuffix(".npy")] = arr
            return out
    except Exception as e:  # noqa: BLE001
        if why is not None:
            why.append(f"{type(e).__name__}: {e}")
        return None


def jsonl_lines(data: bytes):
    """The JSON values of the non-blank lines of `data` (split on b"\\n" only, as JSON Lines is), or None."""
    rows = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        ok, v = strict_json(line)
        if not ok:
            return None
        rows.append(v)
    return rows


def prepared_contract(prep) -> None:
    """What thinkrec/data/prepared.py promises every later stage: items by position ("item", "raw_id"), users and
    items indexed by the interactions."""
    cols = [getattr(prep.inter, k) for k in ("user", "item", "label", "timestamp", "split")]
    assert all(c.ndim == 1 and len(c) == len(cols[0]) for c in cols), [c.shape for c in cols]
    assert isinstance(prep.users, list) and isinstance(prep.stats, dict)
    assert all(isinstance(it, dict) and it.get("item") == i and "raw_id" in it for i, it in enumerate(prep.items))
    if len(cols[0]):
        assert 0 <= prep.inter.user.min() and prep.inter.user.max() < len(prep.users)
        assert 0 <= prep.inter.item.min() and prep.inter.item.max() < len(prep.items)


# ------------------------------------------------------------------------------------------ generators
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=8), st.sampled_from(["ours", "official", "fp32", "bf16", "global", "1e400",
                                                              "thinkrec-lora", "__float__", ""]))
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["name", "tag", "state", "args", "format", "r", "alpha", "stages", "lr", "row", "x", "__float__"]),
    inner, max_size=4), max_leaves=8)


def _edit(draw, obj):
    """`obj` with one field (at the top or one level down) dropped or given a generated value."""
    obj = json.loads(json.dumps(obj))
    target = obj
    if isinstance(target, dict) and target and draw(st.booleans()):
        inner = [k for k, v in target.items() if isinstance(v, (dict, list)) and v]
        if inner:
            target = target[draw(st.sampled_from(sorted(inner)))]
    if isinstance(target, list) and target:
        i = draw(st.integers(0, len(target) - 1))
        if draw(st.integers(0, 3)) == 0:
            target.pop(i)
        else:
            target[i] = draw(json_value)
    elif isinstance(target, dict) and target:
        key = draw(st.sampled_from(sorted(target)))
        if draw(st.integers(0, 3)) == 0:
            target.pop(key)
        else:
            target[key] = draw(json_value)
    return obj


class Damaged(bytes):
    """The damaged bytes, shown by how they were made (Hypothesis prints every draw of a failing example)."""

    how = ""

    def __repr__(self):
        head = bytes(self[:60])
        return f"<{self.how}: {len(self)} bytes {head!r}{'...' if len(self) > 60 else ''}>"


class Made(dict):
    def __repr__(self):
        return "<the made run>"


@st.composite
def damaged(draw, data: bytes, hot=None, others: tuple = (), edit=None):
    """(how, bytes): `data` intact, truncated at a generated offset, with 1-4 generated bits flipped (half the
    time in `hot`: its first `hot` bytes or (start, end) regions, a safetensors header, an npz's zip and array
    headers), emptied, or replaced by generated bytes, by one of `others` (other valid files of the format), or
    by `edit(draw)` (the JSON edited)."""
    hot = [(0, hot)] if isinstance(hot, int) else hot or [(0, len(data))]
    how, out = draw(_damage(data, hot, others, edit))
    out = Damaged(out)
    out.how = how
    return how, out


@st.composite
def _damage(draw, data: bytes, hot, others, edit):
    ways = ["intact", "truncate", "flip", "flip", "empty", "garbage"]
    ways += ["other"] * bool(others) + ["edit", "edit"] * bool(edit)
    how = draw(st.sampled_from(ways))
    if how == "intact":
        return how, data
    if how == "truncate":
        return how, data[:draw(st.integers(0, len(data)))]
    if how == "flip":
        where = st.one_of(*(st.integers(8 * a, 8 * min(b, len(data)) - 1) for a, b in hot))
        where |= st.integers(0, 8 * len(data) - 1)
        out = bytearray(data)
        for bit in draw(st.lists(where, min_size=1, max_size=4)):
            out[bit // 8] ^= 1 << bit % 8
        return how, bytes(out)
    if how == "empty":
        return how, b""
    if how == "other":
        return how, draw(st.sampled_from(others))
    if how == "edit":
        return how, edit(draw)
    return how, draw(st.binary(max_size=300) | json_value.map(lambda v: json.dumps(v).encode()))


def refused_well(e: BaseException, path: Path, hint: str) -> None:
    """`e` is one of our user errors, in one line naming `path` and containing `hint` (what to delete / redo)."""
    msg = str(e)
    assert isinstance(e, UserError), f"{type(e).__name__}: {msg}"
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    assert str(path) in msg, f"the message does not name {path}: {msg}"
    assert hint in msg, f"the message does not say {hint!r}: {msg}"


def read_or_refuse(path: Path, data: bytes, original: bytes, hint: str, call, check) -> str:
    """Write `data` to `path`, call the reader: it returns (then `check(result)` holds) or refuses well. Any
    other exception propagates and fails the example. An intact file must read. Returns "read" or "refused"."""
    path.write_bytes(data)
    try:
        result = call()
    except USER_ERRORS as e:
        assert data != original, f"an intact {path.name} was refused: {e}"
        refused_well(e, path, hint)
        return "refused"
    check(result)
    return "read"


# ------------------------------------------------------------------------------------------- artifacts
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 2))
        self.b = torch.nn.Parameter(torch.randn(2))


def _optimizer(module):
    return torch.optim.AdamW(module.parameters(), lr=1e-3)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The artifacts of a tiny run, written once by the project's writers: {name: bytes} and what reads them."""
    from tests.data_fixtures import toy_prepared
    from tests.test_model_lm import make_lm
    from thinkrec.cf.mf import MF
    from thinkrec.cf.train import save as save_cf
    from thinkrec.data.prepared import save_prepared
    from thinkrec.model import save_adapters
    from thinkrec.rundir import RunDir
    from thinkrec.train import checkpoint

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    rows = [(u, i, (u + i) % 2, 100 * u + i, 0 if i < 3 else (1 if i == 3 else 2)) for u in range(4) for i in range(5)]
    prep = toy_prepared(rows)
    prep.items[2]["title"] = "Amélie (2001)\u2028\x85 ✓"  # text a JSON writer keeps raw (ensure_ascii=False)
    save_prepared(prep, run)
    save_cf(run, "mf", MF(prep.n_users, prep.n_items, 4), prep, {"selected": {"valid_auc": math.nan}})
    atomic_write_bytes(run / "experts" / "groups.safetensors", st_save({
        "labels": torch.tensor([0, 1, 0, 1]), "centroids": torch.randn(2, 4), "weights": torch.rand(4, 3),
        "route": torch.tensor([0, 1, 0, 1]), "center": torch.zeros(4)}))
    lm = make_lm(n_experts=1)
    save_adapters(lm, run / "stage1")
    module = Tiny()
    opt = _optimizer(module)
    module.w.sum().backward()
    opt.step()
    state = {"step": 3, "best_score": -math.inf, "history": [{"auc": math.nan, "loss": 0.5}], "epoch": 1}
    checkpoint.save(run / "stage1" / "ckpt", dict(module.named_parameters()), opt, state,
                    best={n: p.detach() + 1 for n, p in module.named_parameters()})
    RunDir(run).write_config({"lr": 1e-3, "epochs": 1.0, "batch_size": 8, "traces": None, "grad_ckpt": False,
                              "experts": "auto", "run_dir": run, "recipe": "official"})
    write_json(run / "metrics.json", {"args": {"lr": "0.001", "batch_size": "8", "traces": "None", "grad_ckpt": "False",
                                               "experts": "auto"}, "test": {"auc": 0.61, "uauc": None}})
    precision.record(run, precision.Precision("fp32", "auto", "cpu", "no native bf16", None))
    recipe.record(run, recipe.OFFICIAL)
    traces = AppendLog(run / "reasoning" / "traces.jsonl")
    for r in range(len(prep.inter)):
        if prep.inter.split[r] == 0 and r % 2 == 0:
            traces.append({"split": "train", "row": r, "label": int(prep.inter.label[r]),
                           "reason": f"row {r}: liked ✓ — \u2028 next paragraph" if r % 4 else f"row {r}"})
    files = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()
             and p.name != ".lock"}
    others = {name: _other_safetensors(files[name]) for name in ST_FILES}
    others["data/interactions.npz"] = _other_npz(files["data/interactions.npz"])
    return Made({"run": run, "files": files, "others": others, "lm": lm, "prep": prep,
                 "state0": {k: v.clone() for k, v in lm.state_dict().items()},
                 "tensors0": {k: v.clone() for k, v in _lm_tensors(lm).items()}})


def _lm_tensors(lm):
    from thinkrec.model.adapters import _tensors

    return _tensors(lm)


@pytest.fixture
def fresh_run(made, tmp_path_factory):
    """A copy of the made run directory, per example (readers may rewrite what they read)."""
    def copy():
        d = tmp_path_factory.mktemp("damaged")
        for rel, data in made["files"].items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
        return d
    return copy


def _rng_kept(call):
    """call() with torch's RNG state restored afterwards (checkpoint.load sets it)."""
    def wrapped():
        state = torch.get_rng_state()
        try:
            return call()
        finally:
            torch.set_rng_state(state)
    return wrapped


# ------------------------------------------------------------------------------------------ safetensors
def _st_header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def _other_safetensors(data: bytes) -> tuple:
    """Valid safetensors files that are not this one: empty, a stray tensor, the same names with other shapes,
    dtypes or names, no metadata."""
    from safetensors.torch import load as st_load

    tensors, meta = st_load(data), safetensors_of(data)[1] or None
    return (st_save({}), st_save({"x": torch.zeros(2)}, metadata=meta),
            st_save({k: v.reshape(-1)[:1].clone() for k, v in tensors.items()}, metadata=meta),
            st_save({k: v.reshape(-1).clone() for k, v in tensors.items()}, metadata=meta),
            st_save({k: v.to(torch.int64 if v.is_floating_point() else torch.float32) for k, v in tensors.items()},
                    metadata=meta),
            st_save({k + ".": v for k, v in tensors.items()}, metadata=meta),
            st_save(dict(tensors)))


ST_FILES = ("stage1/adapters.safetensors", "stage1/ckpt/ckpt.safetensors", "cf/mf.safetensors",
            "experts/groups.safetensors")


@st.composite
def st_damage(draw, made):
    name = draw(st.sampled_from(ST_FILES))
    data = made["files"][name]
    return name, *draw(damaged(data, hot=_st_header_len(data), others=made["others"][name]))


@FUZZ
@given(case=st.data())
def test_damaged_safetensors_read_right_or_name_the_file(made, fresh_run, case):
    name, how, data = case.draw(st_damage(made), label="damage")
    TRIED["safetensors"] += 1
    run = fresh_run()
    _read_safetensors_artifact(made, run, name, data)


def _read_safetensors_artifact(made, run, name, data):
    path, original = run / name, made["files"][name]
    if name == "stage1/adapters.safetensors":
        _adapters(made, run, path, data, original)
    elif name == "stage1/ckpt/ckpt.safetensors":
        _checkpoint(made, run, path, data, original)
    elif name == "cf/mf.safetensors":
        from thinkrec.cf.train import load_embeddings

        def check(t):
            assert_tensors_are(t, data)
            _has(t, ("user_emb", "item_emb"))  # and as its docstring says: float32, [users, D], [items, D], ...
            assert all(v.dtype == torch.float32 for v in t.values()), {k: v.dtype for k, v in t.items()}
            (users, dim), (items, dim2) = t["user_emb"].shape, t["item_emb"].shape
            assert dim == dim2 and t.get("user_bias", torch.zeros(users)).shape == (users,)
            assert t.get("item_bias", torch.zeros(items)).shape == (items,)
            assert t.get("global_bias", torch.zeros(1)).shape == (1,)

        read_or_refuse(path, data, original, "delete it to retrain the CF model mf", lambda: load_embeddings(run, "mf"),
                       check)
    else:
        from thinkrec.experts import load_groups

        def check(groups):
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in groups.items()}
            ref = safetensors_of(data)[0]
            if "center" not in ref:  # load_groups' default for groups written before centring
                tensors.pop("center")
            assert_tensors_are(tensors, data)
            _has(groups, ("labels", "centroids", "weights", "route", "center"))
            (n,), (g, dim) = groups["labels"].shape, groups["centroids"].shape  # what train.py and infer index
            assert groups["weights"].shape == (n, g + 1) and groups["route"].shape == (n,)
            assert groups["center"].shape == (dim,)

        read_or_refuse(path, data, original, f"delete {path.parent}/ to rebuild the expert groups",
                       lambda: load_groups(run), check)


def _has(d: dict, keys) -> None:
    assert set(keys) <= set(d), sorted(d)


def _adapters(made, run, path, data, original):
    """load_adapters into the tiny model: on success the model holds exactly the file's tensors and the
    returned config is adapters.json's; a refusal leaves the model as it was."""
    from thinkrec.model import load_adapters

    lm, d = made["lm"], run / "stage1"

    def check(cfg):
        ok, ref_cfg = strict_json((d / "adapters.json").read_bytes())
        assert ok and same(cfg, ref_cfg)
        ref = safetensors_of((d / "adapters.safetensors").read_bytes())[0]
        tensors = _lm_tensors(lm)
        for k, t in tensors.items():  # the model holds the file's values (in its own dtype, as copy_ casts)
            if k in ref:
                assert_holds(t, ref[k], k)
            else:  # a projector buffer saved before it existed: its neutral value
                assert k in ("projector.in_mean", "projector.in_std", "projector.out_norm"), k
                assert torch.equal(t, torch.ones_like(t) if k == "projector.in_std" else torch.zeros_like(t)), k

    try:
        if read_or_refuse(path, data, original, f"delete {d}/ and rerun the stage that wrote it",
                          lambda: load_adapters(lm, d), check) == "refused":
            now = _lm_tensors(lm)
            assert all(torch.equal(now[k], v) for k, v in made["tensors0"].items()), "a refused load changed the model"
    finally:
        lm.load_state_dict(made["state0"])


def ref_tensor(entry) -> torch.Tensor:
    dtype, shape, raw = entry
    dt = {v: k for k, v in ST_DTYPES.items()}[dtype]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(shape) if raw else \
        torch.zeros(shape, dtype=dt)


def assert_holds(t: torch.Tensor, entry, what: str) -> None:
    """`t` has the shape and the values (in its own dtype) of a file's tensor."""
    ref = ref_tensor(entry)
    assert tuple(t.shape) == tuple(ref.shape), f"{what}: shape {tuple(t.shape)}, the file's {tuple(ref.shape)}"
    assert torch.equal(t.detach(), ref.to(t.dtype)), f"{what}: other values than the file's"


def _checkpoint(made, run, path, data, original):
    """checkpoint.load into a fresh module and AdamW: on success the parameters, best parameters, AdamW state
    and loop state hold exactly the files' shapes and values."""
    from thinkrec.train import checkpoint

    d = run / "stage1" / "ckpt"
    module = Tiny()
    opt = _optimizer(module)
    params = dict(module.named_parameters())

    def check(result):
        state, best = result
        ok, meta = strict_json((d / "ckpt.json").read_bytes())
        assert ok and same(state, checkpoint._decode(meta)["state"])
        ref = safetensors_of((d / "ckpt.safetensors").read_bytes())[0]
        for n, p in params.items():
            assert_holds(p, ref[f"param.{n}"], f"param.{n}")
        assert sorted(best or {}) == sorted(k[5:] for k in ref if k.startswith("best."))
        for n, t in (best or {}).items():
            assert tensor_key(t) == ref[f"best.{n}"], n
        order = list(params.values())
        for key, entry in ref.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                held = opt.state[order[int(i)]][k]
                assert_holds(held, entry, key)
                assert held.shape in (torch.Size(), order[int(i)].shape), key  # AdamW state fits its parameter
        # the file's settings, and for a setting it lacks (a torch that had none) the optimizer's default
        assert len(opt.param_groups) == len(meta["param_groups"])
        for now, saved in zip(opt.param_groups, meta["param_groups"]):
            assert set(saved) <= set(now) and all(same(now[k], saved[k]) for k in saved if k != "params"), saved

    read_or_refuse(path, data, original, f"delete {d}/ to restart the stage from its beginning",
                   _rng_kept(lambda: checkpoint.load(d, params, opt)), check)


# ------------------------------------------------------------------------------------------------ json
JSON_FILES = ("config.json", "metrics.json", "precision.json", "recipe.json", "stage1/adapters.json",
              "stage1/ckpt/ckpt.json", "data/stats.json", "data/users.json")


@st.composite
def json_damage(draw, made):
    name = draw(st.sampled_from(JSON_FILES))
    data = made["files"][name]
    obj = json.loads(data)
    return name, *draw(damaged(data, edit=lambda d: (json.dumps(_edit(d, obj), allow_nan=True) + "\n").encode()))


@FUZZ
@given(case=st.data())
def test_damaged_json_reads_right_or_names_the_file(made, fresh_run, case):
    name, how, data = case.draw(json_damage(made), label="damage")
    TRIED["json"] += 1
    run = fresh_run()
    _read_json_artifact(made, run, name, data)


def _read_json_artifact(made, run, name, data):
    from thinkrec.rundir import RunDir, _legacy_value

    path, original = run / name, made["files"][name]
    ok, value = strict_json(data)
    if name == "config.json":
        def check(cfg):
            assert ok and isinstance(cfg, dict) and same(cfg, value), cfg
        read_or_refuse(path, data, original, "run train.py --resume with the run's arguments to write it again",
                       RunDir(run).config, check)
    elif name == "metrics.json":  # a run made before config.json: its arguments come from metrics.json
        (run / "config.json").unlink()

        def check(cfg):
            assert ok and isinstance(value, dict) and isinstance(value.get("args", {}), dict), cfg
            assert same(cfg, {k: _legacy_value(v) for k, v in value.get("args", {}).items()})
        read_or_refuse(path, data, original, "run train.py --resume with the run's arguments to write it again",
                       RunDir(run).config, check)
    elif name == "precision.json":
        def check(obj):
            assert ok and same(obj, value) and obj["name"] in precision.PRECISIONS[1:]
        read_or_refuse(path, data, original, "delete", lambda: precision.stored(run), check)  # "PATH: ...; delete it"
    elif name == "recipe.json":
        def check(r):
            assert ok and isinstance(r, recipe.Recipe), r
            assert r.name in recipe.RECIPES
            got = r.to_dict()
            for k, v in value.items():
                if k in got:
                    assert same(got[k], v), (k, got[k], v)
        read_or_refuse(path, data, original, f"delete {path}", lambda: recipe.for_run(run, None), check)
    elif name == "stage1/adapters.json":
        _adapters(made, run, path, data, original)
    elif name == "stage1/ckpt/ckpt.json":
        _checkpoint(made, run, path, data, original)
    else:
        from thinkrec.data.prepared import load_prepared

        def check(prep):
            assert ok and same(prep.stats if name == "data/stats.json" else prep.users, value)
            prepared_contract(prep)
        read_or_refuse(path, data, original, f"delete {run / 'data'}/ to prepare the data again",
                       lambda: load_prepared(run), check)


# ----------------------------------------------------------------------------------------------- jsonl
JSONL_FILES = ("reasoning/traces.jsonl", "reasoning/traces.jsonl (train)", "data/items.jsonl")


@st.composite
def jsonl_damage(draw, made):
    name = draw(st.sampled_from(JSONL_FILES))
    data = made["files"][name.split(" ")[0]]
    lines = data.decode("utf-8").split("\n")[:-1]

    def edit(d):
        i = d(st.integers(0, len(lines) - 1))
        new = list(lines)
        new[i] = json.dumps(_edit(d, json.loads(lines[i])), allow_nan=True, ensure_ascii=False)
        return "".join(x + "\n" for x in new).encode()
    return name, *draw(damaged(data, edit=edit))


@FUZZ
@given(case=st.data())
def test_damaged_jsonl_reads_right_or_names_the_file(made, fresh_run, case):
    name, how, data = case.draw(jsonl_damage(made), label="damage")
    TRIED["jsonl"] += 1
    run = fresh_run()
    _read_jsonl_artifact(made, run, name, data)


def _read_jsonl_artifact(made, run, name, data):
    rel = name.split(" ")[0]
    path, original = run / rel, made["files"][rel]
    if name == "reasoning/traces.jsonl":  # what synth / facts / keywords read to resume: complete lines only
        cut = data.rfind(b"\n") + 1

        def check(rows):
            ref = jsonl_lines(data[:cut])
            assert ref is not None and same(rows, ref), rows
            assert path.read_bytes() == data[:cut]  # a cut last line is dropped from the file too
        read_or_refuse(path, data, original, "delete it to start over", AppendLog(path).read, check)
    elif name == "reasoning/traces.jsonl (train)":  # what train.py reads
        from thinkrec.train.data import read_traces

        prep = made["prep"]

        def check(traces):
            ref = jsonl_lines(data)
            assert ref is not None, traces
            want = {}
            for obj in ref:
                assert isinstance(obj, dict) and {"row", "label", "reason"} <= obj.keys(), obj
                if obj.get("split", "train") == "train":
                    want[int(obj["row"])] = str(obj["reason"])
                    assert prep.inter.label[int(obj["row"])] == int(obj["label"])
            assert traces == want
        read_or_refuse(path, data, original, "synthesize the traces again", lambda: read_traces(path, prep), check)
    else:
        from thinkrec.data.prepared import load_prepared

        def check(prep):
            ref = jsonl_lines(data)
            assert ref is not None and same(prep.items, ref)
            prepared_contract(prep)
        read_or_refuse(path, data, original, f"delete {run / 'data'}/ to prepare the data again",
                       lambda: load_prepared(run), check)


# ------------------------------------------------------------------------------------------------- npz
def _other_npz(data: bytes) -> tuple:
    arrays = npz_of(data)
    out = []
    for change in (lambda a: a[:1], lambda a: a.astype(np.float64), lambda a: a.astype(str),
                   lambda a: a.reshape(-1, 1)):
        buf = io.BytesIO()
        np.savez(buf, **{k: change(v) for k, v in arrays.items()})
        out.append(buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(2))
    return (*out, buf.getvalue())


def _zip_headers(data: bytes) -> list:
    """(start, end) of each member's local header with its .npy header, and of the central directory."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        starts = [i.header_offset for i in z.infolist()]
    return [(a, a + 30 + 16 + 128) for a in starts] + [(data.find(b"PK\x01\x02"), len(data))]


@FUZZ
@given(case=st.data())
def test_damaged_npz_reads_right_or_names_the_file(made, fresh_run, case):
    original = made["files"]["data/interactions.npz"]
    how, data = case.draw(damaged(original, hot=_zip_headers(original), others=made["others"]["data/interactions.npz"]),
                          label="damage")
    TRIED["npz"] += 1
    _read_npz_artifact(made, fresh_run(), data)


def _read_npz_artifact(made, run, data):
    from thinkrec.data.prepared import _COLUMNS, load_prepared

    path, original = run / "data" / "interactions.npz", made["files"]["data/interactions.npz"]

    def check(prep):
        why = []
        ref = npz_of(data, why)
        assert ref is not None, f"read an npz whose members do not all read whole: {why}"
        for k, t in _COLUMNS.items():
            got = getattr(prep.inter, k)
            assert got.dtype == t and np.array_equal(got, ref[k].astype(t)), k
        prepared_contract(prep)
    read_or_refuse(path, data, original, f"delete {run / 'data'}/ to prepare the data again",
                   lambda: load_prepared(run), check)


# ------------------------------------------------------------------------------- intact, and written rows
@pytest.mark.parametrize("name", [*ST_FILES, *JSON_FILES, *JSONL_FILES, "data/interactions.npz"])
def test_intact_artifacts_read_back_as_written(made, fresh_run, name):
    """The baseline of every property: each reader returns what its writer wrote (read_or_refuse refuses
    no intact file), text with U+2028 / U+0085 in it included."""
    run, data = fresh_run(), made["files"][name.split(" ")[0]]
    if name in ST_FILES:
        _read_safetensors_artifact(made, run, name, data)
    elif name in JSON_FILES:
        _read_json_artifact(made, run, name, data)
    elif name in JSONL_FILES:
        _read_jsonl_artifact(made, run, name, data)
    else:
        _read_npz_artifact(made, run, data)


odd_text = st.text(max_size=12) | st.sampled_from(["\u2028", "\u2029", "\x85", "\x1c", "\r", "a\r\nb", "\x00", "é✓"])
row_value = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), odd_text)


@FUZZ
@given(rows=st.lists(st.dictionaries(odd_text, row_value | st.lists(row_value, max_size=3), max_size=4), max_size=5))
def test_jsonl_rows_read_back_as_written(tmp_path_factory, rows):
    """What AppendLog.append and write_jsonl write, AppendLog.read and read_jsonl give back (non-finite floats
    as null, as to_json writes them)."""
    from thinkrec.io import finite, read_jsonl, write_jsonl

    TRIED["jsonl"] += 1
    d = tmp_path_factory.mktemp("rows")
    log = AppendLog(d / "log.jsonl")
    for r in rows:
        log.append(r)
    write_jsonl(d / "all.jsonl", rows)
    assert same(log.read(), finite(rows)) and same(read_jsonl(d / "all.jsonl", "x"), finite(rows))


# ------------------------------------------------------------------------ what the fuzzing found, as examples
# Each was a traceback (or a silently wrong result) before its reader was fixed; the exception it raised then
# is in the comment.

def _refused(call, path, hint, cls=UserError) -> str:
    with pytest.raises(cls) as e:
        call()
    refused_well(e.value, path, hint)
    return str(e.value)


def test_append_log_reads_back_line_separators_inside_strings(tmp_path):
    """to_json keeps U+2028 / U+2029 / U+0085 raw; read() cut lines at them (str.splitlines): an intact traces
    file was refused as damaged (ArtifactError "line 1 is not valid JSON")."""
    rows = [{"reason": "one\u2028two"}, {"reason": "\x85"}, {"reason": "a\u2029b", "row": 3}]
    log = AppendLog(tmp_path / "traces.jsonl")
    for r in rows:
        log.append(r)
    assert log.read() == rows


def test_append_log_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "traces.jsonl"  # was UnicodeDecodeError
    path.write_bytes(b'{"row": 1}\n{"reason": "\xe9"}\n')
    msg = _refused(AppendLog(path).read, path, "delete it to start over", ArtifactError)
    assert "line 2" in msg


@pytest.mark.parametrize("line", [b'{"split": "train", "row": 0, "label": 0, "reason": "\xe9"}',  # UnicodeDecodeError
                                  b'{"split": "train", "row": 1e400, "label": 0, "reason": "x"}'])  # OverflowError
def test_read_traces_bad_line_names_file_line_and_redo(made, tmp_path, line):
    from thinkrec.data import DataError
    from thinkrec.train.data import read_traces

    path = tmp_path / "traces.jsonl"
    path.write_bytes(b'{"split": "valid", "row": 3, "label": 1, "reason": "x"}\n' + line + b"\n")
    msg = _refused(lambda: read_traces(path, made["prep"]), path, "synthesize the traces again", DataError)
    assert f"{path}:2:" in msg


@pytest.mark.parametrize("change", [
    lambda r: b'{"name": "ours\xe9"}',  # UnicodeDecodeError
    lambda r: json.dumps({**r, "stages": [1]}).encode(),  # AttributeError: 'list' object has no attribute 'items'
    lambda r: json.dumps({**r, "stages": {"stage1": {"lr": 1}}}).encode(),  # TypeError: Schedule.__init__() missing...
    lambda r: json.dumps({**r, "cluster": 3}).encode(),  # a Recipe with cluster=3
    lambda r: b"{",  # RecipeError without what to do
])
def test_damaged_recipe_json_says_what_to_delete(fresh_run, change):
    run = fresh_run()
    path = run / "recipe.json"
    path.write_bytes(change(recipe.OFFICIAL.to_dict()))
    _refused(lambda: recipe.for_run(run, None), path, f"delete {path} and rerun train.py --resume")


@pytest.mark.parametrize("name, text", [("metrics.json", '{"args": {"lr": "0.1"'),  # returned {}: defaults used
                                        ("metrics.json", '{"args": [1]}'),  # AttributeError
                                        ("config.json", "[1]")])  # returned [1]
def test_damaged_run_config_is_refused_not_replaced_by_defaults(tmp_path, name, text):
    from thinkrec.rundir import RunDir

    (tmp_path / name).write_text(text)
    _refused(RunDir(tmp_path).config, tmp_path / name, "run train.py --resume with the run's arguments",
             ArtifactError)


@pytest.mark.parametrize("name, change, error_before", [
    ("adapters.json", lambda cfg: {k: v for k, v in cfg.items() if k != "r"}, "KeyError: 'r'"),
    ("adapters.json", lambda cfg: [1], "AdapterFileError with no word of what to do"),
    ("adapters.json", lambda cfg: {**cfg, "alpha": 3.0}, "AdapterFileError naming the directory only"),
    ("adapters.safetensors", None, "AdapterFileError naming the directory only"),
])
def test_damaged_adapters_name_the_file_and_the_directory_to_delete(made, fresh_run, name, change, error_before):
    from thinkrec.model import load_adapters

    run = fresh_run()
    d = run / "stage1"
    if name == "adapters.json":
        (d / name).write_text(json.dumps(change(json.loads((d / name).read_text()))))
    else:
        (d / name).write_bytes(st_save({"x": torch.zeros(1)}))
    try:
        _refused(lambda: load_adapters(made["lm"], d), d / name, f"delete {d}/ and rerun the stage that wrote it")
    finally:
        made["lm"].load_state_dict(made["state0"])


def _ckpt_tensors(d, change):
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    with safe_open(d / "ckpt.safetensors", "pt") as f:
        meta = f.metadata()
    tensors = st_load((d / "ckpt.safetensors").read_bytes())
    change(tensors)
    (d / "ckpt.safetensors").write_bytes(st_save(tensors, metadata=meta))


def _ckpt_json(d, change):
    meta = json.loads((d / "ckpt.json").read_text())
    change(meta)
    (d / "ckpt.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change", [
    lambda d: _ckpt_tensors(d, lambda t: t.update({"param.w": torch.tensor([7.0])})),  # silently broadcast into w
    lambda d: _ckpt_tensors(d, lambda t: t.update({"param.w": torch.zeros(6)})),  # RuntimeError: The size of tensor a
    lambda d: _ckpt_tensors(d, lambda t: t.update({"rng.torch": t["rng.torch"].float()})),  # TypeError: RNG state must
    lambda d: _ckpt_tensors(d, lambda t: t.pop("rng.torch")),  # KeyError: 'rng.torch'
    lambda d: _ckpt_tensors(d, lambda t: t.update({"opt.x": torch.zeros(1)})),  # ValueError: not enough values
    lambda d: _ckpt_tensors(d, lambda t: t.update({"opt.0.exp_avg": torch.zeros(5)})),  # loaded; AdamW's step fails
    lambda d: _ckpt_json(d, lambda m: m.update({"param_groups": [1]})),  # TypeError: argument of type 'int' is not...
    lambda d: _ckpt_json(d, lambda m: m.update({"param_groups": []})),  # ValueError: loaded state dict has a different
    lambda d: _ckpt_json(d, lambda m: m.update({"tag": "x\ny"})),  # a two-line message
])
def test_checkpoint_that_does_not_fit_names_the_file_and_the_directory_to_delete(fresh_run, change):
    from thinkrec.train import checkpoint

    d = fresh_run() / "stage1" / "ckpt"
    change(d)
    module = Tiny()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(UserError) as e:
        _rng_kept(lambda: checkpoint.load(d, dict(module.named_parameters()), _optimizer(module)))()
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg and msg.endswith(f"delete {d}/ to restart the stage from its beginning")
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())  # nothing restored from it


def test_checkpoint_float_marker_of_another_value_is_kept_as_written(fresh_run):
    from thinkrec.train import checkpoint

    d = fresh_run() / "stage1" / "ckpt"
    _ckpt_json(d, lambda m: m["state"].update({"note": {"__float__": "x"}}))  # was ValueError: could not convert
    module = Tiny()
    state, _ = _rng_kept(lambda: checkpoint.load(d, dict(module.named_parameters()), _optimizer(module)))()
    assert state["note"] == {"__float__": "x"} and state["best_score"] == -math.inf


def test_expert_groups_of_other_shapes_name_the_file(fresh_run):
    from thinkrec.experts import load_groups

    run = fresh_run()
    path = run / "experts" / "groups.safetensors"  # was IndexError: tuple index out of range
    path.write_bytes(st_save({k: torch.zeros(4) for k in ("labels", "centroids", "weights", "route")}))
    _refused(lambda: load_groups(run), path, f"delete {path.parent}/ to rebuild the expert groups", ArtifactError)


@pytest.mark.parametrize("tensors", [{"user_emb": torch.zeros(4, dtype=torch.int64), "item_emb": torch.zeros(5, 3)},
                                     {"user_emb": torch.zeros(4, 2), "item_emb": torch.zeros(5, 3)},
                                     {"user_emb": torch.zeros(4, 3), "item_emb": torch.zeros(5, 3),
                                      "user_bias": torch.zeros(5)}])
def test_cf_export_of_other_shapes_names_the_file(fresh_run, tensors):
    from thinkrec.cf.train import load_embeddings

    run = fresh_run()
    path = run / "cf" / "mf.safetensors"  # was returned as it was, against load_embeddings' docstring
    path.write_bytes(st_save(tensors))
    _refused(lambda: load_embeddings(run, "mf"), path, "delete it to retrain the CF model mf", ArtifactError)


@pytest.mark.parametrize("name, change", [
    ("items.jsonl", lambda text: text.replace('"item"', '"itel"', 1)),  # one flipped bit; KeyError in the prompts
    ("items.jsonl", lambda text: text.split("\n", 1)[1]),  # the first item gone: indices shift
    ("users.json", lambda text: '["1"]\n'),  # user indices past the users
])
def test_prepared_data_that_does_not_fit_names_the_file(fresh_run, name, change):
    from thinkrec.data.prepared import load_prepared

    run = fresh_run()
    path = run / "data" / name
    path.write_text(change(path.read_text(encoding="utf-8")), encoding="utf-8")
    _refused(lambda: load_prepared(run), path, f"delete {run / 'data'}/ to prepare the data again", ArtifactError)


@pytest.mark.parametrize("where, bit, before", [
    ("central", 10 * 8 + 1, "NotImplementedError: That compression method is not supported"),
    ("central", 8 * 8, "RuntimeError: File 'user.npy' is encrypted, password required for extraction"),
    ("end", 16 * 8, "OSError: [Errno 22] Invalid argument (a seek before the file's start)"),
])
def test_npz_with_flipped_zip_headers_names_the_file(tmp_path, where, bit, before):
    from thinkrec.io import load_npz

    buf = io.BytesIO()
    np.savez(buf, user=np.arange(20))
    data = bytearray(buf.getvalue())
    at = data.find(b"PK\x01\x02") if where == "central" else data.rfind(b"PK\x05\x06")
    data[at + bit // 8] ^= 1 << bit % 8
    path = tmp_path / "interactions.npz"
    path.write_bytes(bytes(data))
    _refused(lambda: load_npz(path, "delete it"), path, "delete it", ArtifactError)
