"""baselines: untrained copies and shuffled-label demonstrations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icl_lens import backend as B
from icl_lens.baselines import shuffle_labels, untrained, untrained_copy
from icl_lens.tasks import Example


def test_untrained_copy_reinitialises_only_attention_and_mlp():
    model = B.toy_model(2, 32, 4, 50, 64, seed=0, attn_only=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone = untrained_copy(model, seed=1)
    # the original is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    redrawn = {id(p) for _, p in B.attention_parameters(clone)}
    pairs = list(zip(model.parameters(), clone.parameters(), strict=True))
    assert redrawn and len(redrawn) < len(pairs)
    for orig, new in pairs:
        same = torch.equal(orig.detach(), new.detach())
        if id(new) in redrawn:
            assert not same or float(orig.detach().abs().max()) == 0.0
        else:
            assert same, "embeddings, norms and unembedding must be kept"
    tokens = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model(tokens), clone(tokens))


def test_untrained_copy_is_seeded_and_keeps_scale():
    model = B.toy_model(seed=0)
    a, b, c = untrained_copy(model, 3), untrained_copy(model, 3), untrained_copy(model, 4)
    ka, kb, kc = B.kv_parameters(a)[0], B.kv_parameters(b)[0], B.kv_parameters(c)[0]
    assert torch.equal(ka, kb) and not torch.equal(ka, kc)
    orig = B.kv_parameters(model)[0]
    assert float(ka.detach().std()) == pytest.approx(float(orig.detach().std()), rel=0.2)


def test_shuffle_labels_permutes_and_keeps_counts():
    demos = [Example(str(i), {"x": f"w{i}"}, i % 2) for i in range(10)]
    shuffled = shuffle_labels(demos, seed=0)
    assert [d.fields for d in shuffled] == [d.fields for d in demos]
    assert sorted(d.label for d in shuffled) == sorted(d.label for d in demos)
    assert [d.label for d in shuffled] != [d.label for d in demos]
    assert shuffle_labels(demos, 0) == shuffled
    with pytest.raises(ValueError, match="two labels"):
        shuffle_labels([Example("0", {"x": "w"}, 1)] * 3, seed=0)


def test_untrained_in_place_equals_copy_and_restores_exactly():
    model = B.toy_model(2, 32, 4, 50, 64, seed=0, attn_only=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = untrained_copy(model, seed=5).state_dict()
    with untrained(model, seed=5) as m:
        assert m is model
        got = model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), untrained(model, seed=5):
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_untrained_restores_after_a_failure_midway(monkeypatch):
    model = B.toy_model(2, 32, 4, 50, 64, seed=0, attn_only=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = torch.randn, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", flaky)
    with pytest.raises(MemoryError), untrained(model, seed=1):
        pass
    assert calls["n"] == 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_spill_restores_bit_for_bit(dtype):
    """The untrained baseline's originals live in a temporary file and come back exactly."""
    from icl_lens.baselines import _Spill

    gen = torch.Generator().manual_seed(1)
    params = [
        nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in ((3, 4), (5,), (2, 1, 2))
    ]
    before = [p.detach().clone() for p in params]
    with _Spill() as spill:
        for p in params:
            spill.save(p)
            with torch.no_grad():
                p.add_(1.0)
        spill.save(params[0])  # saved twice: the first (original) copy wins on restore
        with torch.no_grad():
            params[0].mul_(3.0)
        spill.restore()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)
        assert p.dtype == dtype


def test_spill_failure_names_the_fix_and_loses_nothing(monkeypatch):
    """A full temp disk mid-backup: a one-line error naming the fix; every weight comes back."""
    import tempfile

    model = B.toy_model(2, 32, 4, 50, 64, seed=0, attn_only=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = tempfile.TemporaryFile

    class FullDisk:
        def __init__(self, *args, **kwargs):
            self._f, self._writes = real(*args, **kwargs), 0

        def write(self, data):
            self._writes += 1
            if self._writes == 3:  # a short write: half the bytes land, then the disk is full
                self._f.write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(tempfile, "TemporaryFile", FullDisk)
    with pytest.raises(OSError, match="TMPDIR"):
        with untrained(model, 0):
            pass
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    monkeypatch.undo()
    with untrained(model, 0):  # and a later backup on a working disk still restores exactly
        pass
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
