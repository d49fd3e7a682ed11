"""Scores for generated explanations against reference texts (one hypothesis per reference).

`explanation_metrics(hypotheses, references)` returns, per metric, `{"value": float, "n": rows}` or, when the
metric cannot be computed here, `{"value": None, "unavailable": reason}` (never a silent 0):

- `meteor`: mean over rows of nltk's `meteor_score([ref_tokens], hyp_tokens, wordnet=...)` on whitespace
  tokens (`str.split()`), as the ThinkRec official evaluation computes it: nltk lowercases, aligns exact
  words, then Porter stems, then WordNet synonyms, and scores Fmean(alpha=0.9) * (1 - 0.5 (chunks/matches)^3).
  WordNet comes from `find_wordnet()` (no download; see there).
- `bleu4`: nltk `corpus_bleu` with uniform 1..4-gram weights on lowercased whitespace tokens (the same
  lowercasing as METEOR's default `str.lower`): clipped n-gram counts are summed over the corpus before
  the precisions are taken, and one brevity penalty uses the total lengths (standard corpus BLEU).
  Smoothing: `SmoothingFunction().method1` (Chen & Cherry 2014), which replaces a zero n-gram match count
  by 0.1, so a corpus without any 4-gram match scores small rather than 0.
- `rouge_l`: ROUGE-L F1 (longest common subsequence) from Google's `rouge-score` package,
  `RougeScorer(["rougeL"], use_stemmer=False)`, mean over rows. Its tokenizer lowercases and keeps only
  [a-z0-9] runs (punctuation and non-ASCII letters are dropped).
- `bleurt`: mean BLEURT score of (reference, hypothesis) pairs from a local PyTorch checkpoint directory
  through the optional `bleurt-pytorch` package; nothing is downloaded.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Sequence

__all__ = ["explanation_metrics", "find_wordnet"]

#: The directory Debian's `wordnet-base` package installs the WordNet 3.0 database into.
SYSTEM_WORDNET_DIR = "/usr/share/wordnet"
#: nltk's resource name for its own WordNet 3.0 package (`python -m nltk.downloader wordnet`).
NLTK_WORDNET_RESOURCE = "corpora/wordnet"

WORDNET_FIX = (
    "install WordNet 3.0 with `apt-get install wordnet-base` (Debian/Ubuntu) or "
    "`python -m nltk.downloader wordnet`, or set THINKREC_WORDNET to a WordNet dict directory"
)

# The 45 lexicographer file names of WordNet 3.0, numbered as in lexnames(5WN). nltk's reader requires a
# `lexnames` file, which Debian's wordnet-base does not ship (its README.Debian: the WordNet C library has
# the list compiled in). The names only label synsets (`Synset.lexname()`); METEOR never reads them.
_WN30_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}  # third column of the lexnames file

_BLEURT_BATCH = 32
_readers: dict[str, object] = {}  # loaded WordNet readers by source (loading one takes a few seconds)


@functools.cache
def _wordnet_reader_class():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNetDirReader(WordNetCorpusReader):
        """nltk's WordNet reader for a plain WordNet 3.0 database directory, with two small shims:

        - a missing `lexnames` file is served from the built-in WordNet 3.0 list (`_WN30_LEXNAMES`);
        - no mapping to nltk's own "wordnet" corpus is built (`map_wn`): recent nltk (3.10 here) builds one
          at load time from `index.sense` files, which a Debian install lacks, and uses it only for the
          multilingual (OMW) lookups, which are off here (`omw_reader=None`). nltk 3.8 never calls map_wn.
        """

        def __init__(self, root, builtin_lexnames: bool):
            self._builtin_lexnames = builtin_lexnames
            with warnings.catch_warnings():  # "multilingual functions are not available": intended
                warnings.simplefilter("ignore")
                super().__init__(root, omw_reader=None)

        def open(self, file):
            if file == "lexnames" and self._builtin_lexnames:
                return io.StringIO(
                    "".join(
                        f"{i:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}\n"
                        for i, name in enumerate(_WN30_LEXNAMES)
                    )
                )
            return super().open(file)

        def map_wn(self, version="wordnet"):
            return None

    return WordNetDirReader


def _load_dir(path: str):
    """A reader for a WordNet database directory (data.noun, index.noun, ...), or raise OSError."""
    import nltk

    if not os.path.isdir(path):
        raise OSError("no such directory")
    needed = ("index.noun", "data.noun", "index.verb", "data.verb")
    missing = [f for f in needed if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise OSError(f"not a WordNet database directory (no {', '.join(missing)})")
    # nltk 3.10 only opens files under nltk.data.path (its nltk.pathsec sandbox); appending the directory
    # is the authorisation nltk itself asks for. It also makes nltk.data.find look there, which is harmless.
    root = os.path.realpath(path)
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    return _wordnet_reader_class()(root, builtin_lexnames=not os.path.isfile(os.path.join(root, "lexnames")))


def find_wordnet() -> tuple[object | None, str]:
    """WordNet for METEOR without any download: `(reader, "where it came from")` or `(None, reason)`.

    Tried in order: the directory in env var THINKREC_WORDNET, nltk's own data (`corpora/wordnet` on
    `nltk.data.path`, from `python -m nltk.downloader wordnet`), then `/usr/share/wordnet` (Debian's
    `wordnet-base`). Readers are cached per source.
    """
    try:
        import nltk
    except ImportError:
        return None, "nltk is not installed (pip install nltk)"

    def from_nltk_data():
        # the downloader leaves either a directory or a zip (found only as "corpora/wordnet.zip/wordnet/")
        name = NLTK_WORDNET_RESOURCE.rsplit("/", 1)[-1]
        for resource in (NLTK_WORDNET_RESOURCE, f"{NLTK_WORDNET_RESOURCE}.zip/{name}/"):
            try:
                root = nltk.data.find(resource)
            except LookupError:
                continue
            return _wordnet_reader_class()(root, builtin_lexnames=False)  # nltk's package has lexnames
        raise OSError(f"{NLTK_WORDNET_RESOURCE} (or .zip) is not on nltk.data.path")

    sources = []
    if os.environ.get("THINKREC_WORDNET"):
        env_dir = os.environ["THINKREC_WORDNET"]
        sources.append((f"THINKREC_WORDNET={env_dir}", lambda: _load_dir(env_dir)))
    sources.append((f"nltk data {NLTK_WORDNET_RESOURCE}", from_nltk_data))
    sources.append((SYSTEM_WORDNET_DIR, lambda: _load_dir(SYSTEM_WORDNET_DIR)))

    failures = []
    for label, load in sources:
        if label not in _readers:
            try:
                _readers[label] = load()
            except (OSError, ValueError, LookupError) as e:  # PermissionError (nltk sandbox) is an OSError
                failures.append(f"{label}: {e}")
                continue
        return _readers[label], f"WordNet {_readers[label].get_version()} from {label}"
    return None, f"WordNet not found ({'; '.join(failures)}); {WORDNET_FIX}"


def _check_inputs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"explanation_metrics: {len(hypotheses)} hypotheses but {len(references)} references; "
            "they are paired row by row"
        )
    for name, texts in (("hypotheses", hypotheses), ("references", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"explanation_metrics: {name}[{i}] is {type(text).__name__}, expected str")


def _unavailable(reason: str) -> dict:
    return {"value": None, "unavailable": reason}


def _meteor(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    wordnet, reason = find_wordnet()
    if wordnet is None:
        return _unavailable(reason)
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([r.split()], h.split(), wordnet=wordnet) for h, r in zip(hypotheses, references)]
    return {"value": sum(scores) / len(scores), "n": len(scores)}


def _bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    hyps = [[w.lower() for w in h.split()] for h in hypotheses]
    refs = [[[w.lower() for w in r.split()]] for r in references]
    value = corpus_bleu(refs, hyps, weights=(0.25,) * 4, smoothing_function=SmoothingFunction().method1)
    return {"value": float(value), "n": len(hyps)}


def _rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    try:
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError:
        return _unavailable("package rouge-score is not installed (pip install rouge-score)")
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    # RougeScorer.score takes (target, prediction)
    scores = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return {"value": sum(scores) / len(scores), "n": len(scores)}


def _bleurt(hypotheses: Sequence[str], references: Sequence[str], checkpoint: str | None) -> dict:
    if checkpoint is None:
        return _unavailable("no --bleurt-checkpoint given")
    if not os.path.isdir(checkpoint):
        return _unavailable(f"BLEURT checkpoint directory {checkpoint} does not exist")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        return _unavailable(f"{checkpoint} is not a BLEURT PyTorch checkpoint (no config.json)")
    try:
        import torch
        from bleurt_pytorch import BleurtForSequenceClassification, BleurtTokenizer
    except ImportError:
        return _unavailable(
            "package bleurt-pytorch is not installed "
            "(pip install git+https://github.com/lucadiliello/bleurt-pytorch.git)"
        )
    try:
        model = BleurtForSequenceClassification.from_pretrained(checkpoint, local_files_only=True)
        tokenizer = BleurtTokenizer.from_pretrained(checkpoint, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        return _unavailable(f"cannot load a BLEURT checkpoint from {checkpoint}: {e}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    max_length = getattr(model.config, "max_position_embeddings", 512)
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(hypotheses), _BLEURT_BATCH):
            batch = tokenizer(
                list(references[start : start + _BLEURT_BATCH]),
                list(hypotheses[start : start + _BLEURT_BATCH]),
                padding="longest",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            scores += model(**batch).logits.flatten().float().tolist()
    return {"value": sum(scores) / len(scores), "n": len(scores)}


def explanation_metrics(
    hypotheses: Sequence[str], references: Sequence[str], bleurt_checkpoint: str | None = None
) -> dict:
    """METEOR, BLEU-4, ROUGE-L and BLEURT of `hypotheses[i]` against `references[i]` (see the module doc).

    Raises ValueError when the lengths differ and TypeError for a non-string row.
    """
    _check_inputs(hypotheses, references)
    names = ("meteor", "bleu4", "rouge_l", "bleurt")
    if len(hypotheses) == 0:
        return {name: _unavailable("no rows") for name in names}
    return {
        "meteor": _meteor(hypotheses, references),
        "bleu4": _bleu4(hypotheses, references),
        "rouge_l": _rouge_l(hypotheses, references),
        "bleurt": _bleurt(hypotheses, references, bleurt_checkpoint),
    }
