"""The toy tokenizer, the synthetic ICL task, the trainer and the committed toy checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icl_lens import backend
from icl_lens.tasks import build_prompt, label_token_ids
from icl_lens.toy import (
    DEFAULT_PATH,
    ToyTokenizer,
    generate_batch,
    load_toy,
    save_toy,
    toy_episode,
    toy_forward,
    toy_icl_accuracy,
    toy_task,
    train_toy,
)

TOK = ToyTokenizer()
HELD_OUT_SEED = 31337  # training draws from default_rng(0); make_toy evaluates with 2024


@pytest.fixture(scope="module")
def committed():
    return load_toy()


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_vocab_and_specials():
    assert len(TOK) == TOK.vocab_size == 5 + 2 + 48
    ids = {TOK.bos_token_id, TOK.pad_token_id, TOK.unk_token_id, TOK.newline_id, TOK.colon_id}
    assert len(ids) == 5 and TOK.eos_token_id == TOK.bos_token_id
    assert TOK.convert_tokens_to_ids(["w0", ":", " A"]) == [7, 4, 5]
    assert TOK.convert_ids_to_tokens([7, 4, 5]) == ["w0", ":", "A"]
    assert TOK.encode("w3 :", add_special_tokens=True)[0] == TOK.bos_token_id


def test_tokenizer_round_trip_and_layout():
    text = "w3 : A\nw12 : B\nw3 :"
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text and TOK.encode(TOK.decode(ids)) == ids
    assert TOK.encode("\n") == [TOK.newline_id] and TOK.encode(" A") == TOK.encode("A")
    assert TOK.decode([TOK.bos_token_id, *ids], skip_special_tokens=True) == text
    assert TOK("w1 :")["input_ids"] == TOK.encode("w1 :")
    assert TOK(["w1 :", "w2 :"], return_tensors="pt")["input_ids"].shape == (2, 2)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, len(TOK) - 1), max_size=30))
def test_tokenizer_round_trip_any_ids(ids):
    assert TOK.encode(TOK.decode(ids)) == ids


def test_tokenizer_unknown_words():
    with pytest.raises(ValueError, match="unknown word 'cat'"):
        TOK.encode("cat :")
    assert ToyTokenizer(strict=False).encode("cat :") == [TOK.unk_token_id, TOK.colon_id]


def test_label_words_are_single_tokens():
    task = toy_task(2)
    assert task.template == "{x} :" and task.label_words == (" A", " B")
    assert label_token_ids(task, TOK) == TOK.label_ids
    assert all(len(TOK.encode(w)) == 1 for w in task.label_words)


# --------------------------------------------------------------------------- synthetic data


def test_generate_batch_layout():
    b = generate_batch(8, 5, seed=1)
    assert b.tokens.shape == (8, 4 * 6) and b.tokens.dtype == torch.long
    assert (b.tokens[:, 0] == TOK.bos_token_id).all()
    assert (b.tokens[:, 2::4] == TOK.colon_id).all() and (b.tokens[:, 4::4] == TOK.newline_id).all()
    assert torch.isin(b.tokens[:, 1::4], torch.tensor(TOK.item_ids)).all()
    assert torch.isin(b.tokens[:, b.label_mask[0]], torch.tensor(TOK.label_ids)).all()
    assert (b.label_mask.sum(1) == 6).all() and not (b.seen_mask & ~b.label_mask).any()
    assert b.seen_mask[:, -1].all()  # the query's item is among the demonstrations


def test_generate_batch_is_deterministic():
    a, b, c = generate_batch(4, 6, 7), generate_batch(4, 6, 7), generate_batch(4, 6, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("balanced", [False, True])
def test_fresh_mapping_per_sequence(balanced):
    b = generate_batch(256, 12, seed=3, n_items=(2, 6), balanced=balanced)
    maps = []
    for row in b.tokens.tolist():
        items, labels = row[1::4], row[3::4]
        m: dict[int, int] = {}
        for i, lab in zip(items, labels, strict=True):
            assert m.setdefault(i, lab) == lab  # consistent within a sequence
        maps.append(m)
        assert len(m) <= 6
    clashes = sum(a[i] != b_[i] for a in maps[:40] for b_ in maps[40:80] for i in a.keys() & b_)
    assert clashes > 0  # ...but not across sequences
    if balanced:
        assert all(len(set(m.values())) == 2 for m in maps if len(m) >= 4)


def test_toy_episode_shares_one_mapping():
    demos, evals = toy_episode(seed=4, n_demos=16, n_eval=20)
    assert (len(demos), len(evals)) == (16, 20)
    mapping = {d.fields["x"]: d.label for d in demos}
    assert all(mapping.setdefault(d.fields["x"], d.label) == d.label for d in demos)
    assert all(e.fields["x"] in mapping and mapping[e.fields["x"]] == e.label for e in evals)
    assert {d.label for d in demos} == {0, 1}
    assert len({x.id for x in demos + evals}) == 36
    again, _ = toy_episode(seed=4, n_demos=16, n_eval=20)
    other, _ = toy_episode(seed=5, n_demos=16, n_eval=20)
    assert again == demos and other != demos


def test_build_prompt_matches_training_layout():
    demos, evals = toy_episode(seed=0, n_demos=3, n_eval=1)
    p = build_prompt(toy_task(), TOK, evals[0], demos)
    body = [t for d in demos for t in TOK.encode(f"{d.fields['x']} : {'AB'[d.label]}\n")]
    assert p.tokens == [TOK.bos_token_id, *body, *TOK.encode(f"{evals[0].fields['x']} : A")]
    assert p.spans.predict_pos == len(p.tokens) - 2 and p.tokens[-2] == TOK.colon_id


# --------------------------------------------------------------------------- committed toy


def test_committed_checkpoint_loads_with_reference_logits(committed):
    model, tok, task = committed
    assert isinstance(model, backend.NATIVE_CLASS)
    assert DEFAULT_PATH.stat().st_size < 2_000_000
    cfg = json.loads(DEFAULT_PATH.with_suffix(".json").read_text())
    assert backend.dims(model).d_vocab == len(tok) and task == toy_task(2)
    ref = cfg["training"]["reference"]
    with torch.no_grad():
        out = model(torch.tensor([ref["tokens"]]))[0, -2]
    torch.testing.assert_close(out, torch.tensor(ref["logits_at_-2"]), atol=1e-4, rtol=1e-4)


def test_toy_forward_matches_native_forward(committed):
    model = committed[0]
    tokens = generate_batch(4, 20, seed=HELD_OUT_SEED).tokens
    with torch.no_grad():
        native = model(tokens)
        mirror = toy_forward(backend.neutral_state_dict(model), tokens, 2)
    torch.testing.assert_close(mirror, native, atol=1e-4, rtol=1e-4)


def test_committed_toy_learns_in_context(committed):
    model, tok, _ = committed
    icl = toy_icl_accuracy(model, 256, 16, HELD_OUT_SEED, tokenizer=tok)
    zs = toy_icl_accuracy(model, 256, 16, HELD_OUT_SEED, with_demos=False, tokenizer=tok)
    long = toy_icl_accuracy(model, 64, 47, HELD_OUT_SEED, tokenizer=tok)  # the full context
    assert icl > 0.9 and long > 0.9  # measured 1.0 and 0.997 at make time
    assert icl > zs + 0.3
    assert abs(zs - 0.5) < 0.12  # chance: each sequence has its own mapping


def test_committed_toy_solves_episode_through_build_prompt(committed):
    model, tok, task = committed
    demos, evals = toy_episode(seed=HELD_OUT_SEED, n_demos=32, n_eval=24)
    lab = label_token_ids(task, tok)
    prompts = [build_prompt(task, tok, e, demos) for e in evals]
    with torch.no_grad():
        logits = model(torch.tensor([p.tokens for p in prompts]))[:, -2, lab]
    acc = (logits.argmax(-1) == torch.tensor([e.label for e in evals])).float().mean()
    assert acc > 0.9


def test_accuracy_rejects_prompts_longer_than_context(committed):
    with pytest.raises(ValueError, match="n_ctx=192"):
        toy_icl_accuracy(committed[0], 4, 60)


# --------------------------------------------------------------------------- save / train


def test_save_load_round_trip(tmp_path):
    model = backend.toy_model(n_layers=2, d_model=16, n_heads=2, d_vocab=len(TOK), n_ctx=32)
    sd = backend.neutral_state_dict(model)
    sd["unembed.b_U"] = torch.zeros_like(sd["unembed.b_U"])
    backend.load_neutral_state_dict(model, sd)
    path = save_toy(model, TOK, tmp_path / "mini")
    loaded, tok, task = load_toy(path)
    x = generate_batch(2, 3, 0).tokens
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert tok.vocab == TOK.vocab and task.label_words == (" A", " B")
    path.with_suffix(".json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an icl_lens toy"):
        load_toy(path)


SMALL = dict(n_demos=(1, 7), n_items=(2, 4), n_ctx=32, d_model=32, batch_size=16, progress=False)


def test_train_smoke_loss_decreases():
    model, tok, info = train_toy(steps=40, **SMALL)
    losses = info["losses"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert isinstance(model, backend.NATIVE_CLASS)
    sd = backend.neutral_state_dict(model)
    assert sd["unembed.b_U"].abs().max() == 0


def test_train_is_deterministic():
    a = backend.neutral_state_dict(train_toy(steps=4, seed=3, **SMALL)[0])
    b = backend.neutral_state_dict(train_toy(steps=4, seed=3, **SMALL)[0])
    assert all(torch.equal(a[k], b[k]) for k in a)
