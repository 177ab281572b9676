"""Checks made before any model loads: names, ``--out``, the model name, the network, the
``--data`` template and label words. Each failure is a :class:`UsageError` naming the fix."""

from __future__ import annotations

import difflib
import importlib
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from icl_lens.cli.defaults import BUNDLES
from icl_lens.cli.errors import UsageError
from icl_lens.tasks import template_fields  # a stdlib-only module: --help stays fast

_TRUE = ("1", "on", "yes", "true")  # how huggingface_hub reads its *_OFFLINE variables


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices`` (case-insensitive; the two
    closest if they tie), else ``""``."""
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=2, cutoff=0.6)
    ratio = [difflib.SequenceMatcher(None, name.lower(), c).ratio() for c in close]
    close = [c for c, r in zip(close, ratio, strict=True) if r == ratio[0]]
    return f"did you mean {' or '.join(repr(lowered[c]) for c in close)}? " if close else ""


def _check_names(given: Sequence[str], known: Sequence[str], what: str) -> None:
    for name in given:
        if name not in known:
            raise UsageError(
                f"unknown {what} {name!r}; {_did_you_mean(name, known)}"
                f"the {what}s are: {', '.join(known)}"
            )


def _check_writable(path: Path, flag: str) -> None:
    """Raise unless files can be written under ``path`` (creating nothing): its nearest
    existing ancestor must be a directory in which a file can be made."""
    probe = path.expanduser()
    try:
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise UsageError(
                f"{flag} {path}: {probe} is a file, not a directory; choose another {flag}"
            )
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(
            f"{flag} {path}: cannot write in {probe} ({e.strerror or e}); choose a writable {flag}"
        ) from None


def _offline_env() -> str | None:
    """Which of huggingface_hub's / datasets' offline switches is on, if any."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (huggingface_hub's configured endpoint, through its HTTP
    session and proxies) answers within ``timeout`` seconds; any HTTP status counts."""
    answered = threading.Event()

    def probe() -> None:
        try:
            from huggingface_hub import constants
            from huggingface_hub.utils import get_session

            get_session().head(constants.ENDPOINT, timeout=timeout)
            answered.set()
        except Exception:  # no network, DNS failure, timeout, no huggingface_hub
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # also bounds name resolution, which has no timeout of its own
    return answered.is_set()


def _offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be used now (None when it can)."""
    env = _offline_env()
    if env is not None:
        return env
    if not _hub_reachable():
        from huggingface_hub import constants

        return f"{constants.ENDPOINT} cannot be reached"
    return None


def _tl_checkpoint_cached(name: str) -> bool:
    """Whether the HF checkpoint behind TransformerLens name ``name`` is in the local HF cache."""
    repo = name
    for module in ("transformer_lens.loading_from_pretrained", "transformer_lens.supported_models"):
        try:
            official = importlib.import_module(module).get_official_model_name
        except (ImportError, AttributeError):
            continue
        try:
            repo = official(name)
        except ValueError:
            pass
        break
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:
        return False


def _hf_cache_has_models() -> bool:
    """Whether the local Hugging Face hub cache holds any model checkpoint."""
    try:
        from huggingface_hub import constants

        return any(p.name.startswith("models--") for p in Path(constants.HF_HUB_CACHE).iterdir())
    except (ImportError, OSError):
        return False


def _check_model(name: str) -> None:
    """Raise unless ``name`` can be loaded here: an offline bundle, a checkpoint directory, or
    a TransformerLens name with the hub reachable or its checkpoint in the HF cache."""
    bundles = ", ".join(BUNDLES)
    if name in BUNDLES:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return
        raise UsageError(
            f"--model {name}: the directory has no config.json; pass a Hugging Face checkpoint "
            f"directory (model.save_pretrained(dir)) or an offline bundle: {bundles}"
        )
    if path.exists():
        raise UsageError(
            f"--model {name} is a file; pass an offline bundle ({bundles}), a checkpoint "
            "directory or a TransformerLens name"
        )
    if name.startswith(("/", "./", "../", "~")):
        raise UsageError(f"--model {name}: no such directory")
    hint = _did_you_mean(name, BUNDLES)
    offline = _offline_reason()
    if offline is not None and not _hf_cache_has_models():  # decided without TransformerLens
        raise UsageError(
            f"--model {name!r} is not an offline bundle or a local checkpoint directory, and "
            f"{offline}, so it cannot be fetched (no model is in your Hugging Face cache); "
            f"{hint}the offline bundles are {bundles}"
        )
    from icl_lens.backend import is_tl_name  # imports TransformerLens

    known = is_tl_name(name)
    if known and (offline is None or _tl_checkpoint_cached(name)):
        return
    if known:
        raise UsageError(
            f"--model {name!r} is a TransformerLens name, which needs the Hugging Face hub, and "
            f"{offline}; {hint}the offline bundles are {bundles} (or pass a local checkpoint "
            "directory)"
        )
    raise UsageError(
        f"unknown model {name!r}: not an offline bundle, a local checkpoint directory or a "
        f"TransformerLens name; {hint}the offline bundles are {bundles}"
    )


def _check_template(template: str | None) -> str:
    example = '--template "Review: {text} Sentiment:"'
    if template is None:
        raise UsageError(
            f"--data needs --template with one placeholder for the text, e.g. {example}"
        )
    try:
        fields = template_fields(template)
    except ValueError as e:
        raise UsageError(
            f"--template {template!r}: {e}; write a literal brace as {{{{ or }}}}"
        ) from None
    if len(fields) != 1 or not fields[0].isidentifier():
        raise UsageError(
            f"--template {template!r} has the placeholders {list(fields)}; it needs exactly one, "
            f"named, for the text: e.g. {example}"
        )
    return template


def _parse_label_words(items: Sequence[str] | None) -> dict[str, str]:
    """``VALUE=WORD`` items as {label value: label word}, in label-word order."""
    example = 'e.g. --label-words negative=" Negative" positive=" Positive"'
    if not items:
        raise UsageError(
            "--data needs --label-words, one VALUE=WORD for each label value in the file, "
            + example
        )
    words: dict[str, str] = {}
    for item in items:
        value, sep, word = item.partition("=")
        value = value.strip()
        if not sep or not value:
            raise UsageError(f"--label-words: {item!r} is not VALUE=WORD; {example}")
        if value in words:
            raise UsageError(f"--label-words: the label value {value!r} is given twice")
        if not word.strip():
            raise UsageError(f"--label-words: the word for {value!r} is empty; {example}")
        words[value] = word
    if len(words) < 2:
        raise UsageError(f"--label-words needs at least two label values, {example}")
    seen: dict[str, str] = {}
    for value, word in words.items():
        if word in seen:
            raise UsageError(
                f"--label-words: {seen[word]!r} and {value!r} have the same word {word!r}; "
                "give each label its own word"
            )
        seen[word] = value
    return words
