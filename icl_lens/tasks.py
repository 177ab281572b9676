"""Task specifications (templates, label words) and prompt building with exact index spans.

Prompt layout (the reference convention)::

    [BOS] demo_1_input demo_1_label SEP ... demo_k_input demo_k_label SEP query_input LABEL_0

Every piece is tokenised on its own and the ids concatenated, so each span is exact and all
prompts with the same demonstrations share the same prefix tokens (for KV caching). The first
label word is appended to every prompt: predictions are read at the query's last token (−2),
activations are recorded at the appended label token (−1) by default.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from icl_lens.checks import warn

RECORD_MODES = ("label", "predict")


class Tokenizer(Protocol):
    """What icl-lens needs from a tokenizer (HF tokenizers and the toy tokenizer both fit)."""

    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]


def template_fields(template: str) -> tuple[str, ...]:
    """Placeholder names of a ``str.format`` template, in order of first use."""
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in names:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class TaskSpec:
    """One classification task: how an example is rendered and which words are its labels.

    ``template`` uses ``{x}`` (single text field) or named fields such as ``{premise}``.
    ``label_words`` carry their leading space, e.g. ``(" Negative", " Positive")``.
    ``hf_text_columns`` are the dataset columns feeding ``text_fields``, in the same order.
    """

    name: str
    template: str
    label_words: tuple[str, ...]
    text_fields: tuple[str, ...] = ("x",)
    separator: str = "\n"
    hf_path: str | None = None
    hf_name: str | None = None
    hf_eval_split: str | None = None
    hf_text_columns: tuple[str, ...] = ("sentence",)
    hf_label_column: str = "label"
    staicc_name: str | None = None

    def __post_init__(self) -> None:
        for attr in ("label_words", "text_fields", "hf_text_columns"):
            value = getattr(self, attr)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, attr, tuple(value))
        if len(self.label_words) < 2:
            raise ValueError(
                f"task {self.name!r} needs at least 2 label words, got {self.label_words}"
            )
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"task {self.name!r} has repeated label words {self.label_words}")
        used = template_fields(self.template)
        if set(used) != set(self.text_fields):
            raise ValueError(
                f"task {self.name!r}: template fields {list(used)} do not match text_fields "
                f"{list(self.text_fields)}; pass text_fields={used!r}"
            )

    @property
    def n_labels(self) -> int:
        return len(self.label_words)


@dataclass(frozen=True)
class Example:
    """One labelled example. ``id`` is stable across runs (index in the source split)."""

    id: str
    fields: dict[str, str] = field(hash=False)
    label: int


_SENT = "Sentence: {x} Label:"
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("sst2", _SENT, (" Negative", " Positive"), hf_path="glue", hf_name="sst2",
                 hf_eval_split="validation", hf_text_columns=("sentence",), staicc_name="sst2"),
        TaskSpec("sst5", _SENT, (" terrible", " bad", " neutral", " good", " great"),
                 hf_path="SetFit/sst5", hf_eval_split="validation", hf_text_columns=("text",),
                 staicc_name="sst5"),
        TaskSpec("mr", "Review: {x} Sentiment:", (" Negative", " Positive"),
                 hf_path="rotten_tomatoes", hf_eval_split="validation",
                 hf_text_columns=("text",), staicc_name="rotten_tomatoes"),
        TaskSpec("subj", "Input: {x} Type:", (" objective", " subjective"),
                 hf_path="SetFit/subj", hf_eval_split="test", hf_text_columns=("text",),
                 staicc_name="subjective"),
        TaskSpec("agnews",
                 "Classify the news articles into the categories of World, Sports, Business, "
                 "and Technology. Article: {x} Answer:",
                 (" World", " Sports", " Business", " Technology"),
                 hf_path="ag_news", hf_eval_split="test", hf_text_columns=("text",),
                 staicc_name="agnews"),
        TaskSpec("cb", "{premise} Question: {hypothesis}. True, False, or Neither? Answer:",
                 (" True", " False", " Neither"), text_fields=("premise", "hypothesis"),
                 hf_path="super_glue", hf_name="cb", hf_eval_split="validation",
                 hf_text_columns=("premise", "hypothesis")),
    ]
}  # fmt: skip


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The built-in task ``name`` (a TaskSpec passes through unchanged)."""
    if isinstance(name, TaskSpec):
        return name
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
            "(or build your own TaskSpec(name, template, label_words, text_fields))"
        )
    return TASKS[name]


def format_input(task: TaskSpec, example: Example) -> str:
    """The task's template filled with the example's text fields."""
    missing = [f for f in task.text_fields if f not in example.fields]
    if missing:
        raise ValueError(
            f"example {example.id!r} lacks fields {missing} needed by task {task.name!r} "
            f"(it has {sorted(example.fields)})"
        )
    return task.template.format(**{f: example.fields[f] for f in task.text_fields})


def _label_word(task: TaskSpec, example: Example) -> str:
    if not 0 <= example.label < task.n_labels:
        raise ValueError(
            f"example {example.id!r} has label {example.label} but task {task.name!r} has "
            f"{task.n_labels} labels (0..{task.n_labels - 1})"
        )
    return task.label_words[example.label]


class LabelWordError(ValueError):
    """Label words that are not one distinct token each. ``multi_token`` maps each word that is
    not one token to its ids (empty when the words are single tokens but share ids)."""

    def __init__(self, message: str, multi_token: dict[str, list[int]]) -> None:
        super().__init__(message)
        self.multi_token = multi_token


def label_token_ids(task: TaskSpec, tokenizer: Tokenizer) -> list[int]:
    """One token id per label word; raises :class:`LabelWordError` if a label word is not
    exactly one token, or two words are the same token."""
    encoded = {w: _encode(tokenizer, w) for w in task.label_words}
    bad = {w: ids for w, ids in encoded.items() if len(ids) != 1}
    if bad:
        shown = "; ".join(f"{w!r} -> {ids}" for w, ids in bad.items())
        raise LabelWordError(
            f"task {task.name!r}: label words must be single tokens, but {shown}; choose label "
            "words that are single tokens for this tokenizer, e.g. pass "
            "label_words=(' yes', ' no') via dataclasses.replace(task, label_words=...)",
            bad,
        )
    ids = [encoded[w][0] for w in task.label_words]
    if len(set(ids)) != len(ids):
        raise LabelWordError(
            f"task {task.name!r}: label words {task.label_words} share token ids {ids}; "
            "choose label words that map to distinct tokens",
            {},
        )
    return ids


Span = tuple[int, int]


@dataclass(frozen=True)
class PromptSpans:
    """Where each piece of a prompt lives; spans are half-open ``[start, end)`` token indices."""

    bos: int | None
    demo_inputs: list[Span]
    demo_labels: list[Span]
    separators: list[Span]
    query: Span
    predict_pos: int
    record_pos: int

    @property
    def prefix_len(self) -> int:
        """Tokens before the query input (BOS, demos, separators): the shared KV-cache prefix."""
        return self.query[0]

    def demo_token_positions(self) -> list[int]:
        """All demo input and label token indices in order (no BOS, no separators)."""
        return [
            p
            for (a, b), (c, d) in zip(self.demo_inputs, self.demo_labels, strict=True)
            for p in [*range(a, b), *range(c, d)]
        ]

    def demo_of_position(self) -> list[int]:
        """The demo index of each entry of :meth:`demo_token_positions`."""
        return [
            i
            for i, ((a, b), (c, d)) in enumerate(
                zip(self.demo_inputs, self.demo_labels, strict=True)
            )
            for _ in range((b - a) + (d - c))
        ]

    def query_positions(self) -> list[int]:
        """Token indices of the query's formatted input."""
        return list(range(*self.query))


@dataclass(frozen=True)
class Prompt:
    """A tokenised ICL (or zero-shot) prompt with its spans and gold label."""

    tokens: list[int]
    spans: PromptSpans
    label: int
    example_id: str
    n_demos: int
    demo_ids: tuple[str, ...] = ()
    record: str = "label"

    def __len__(self) -> int:
        return len(self.tokens)


def _bos(tokenizer: Tokenizer, prepend_bos: bool) -> list[int]:
    if not prepend_bos:
        return []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("tokenizer has no bos_token_id; pass prepend_bos=False")
    return [int(bos)]


def build_prefix(
    task: TaskSpec, tokenizer: Tokenizer, demos: Sequence[Example], *, prepend_bos: bool = True
) -> tuple[list[int], list[Span], list[Span], list[Span]]:
    """Prefix tokens (BOS + demos + separators) and the demo input, label and separator spans."""
    tokens = _bos(tokenizer, prepend_bos)
    sep = _encode(tokenizer, task.separator)
    inputs: list[Span] = []
    labels: list[Span] = []
    seps: list[Span] = []
    for demo in demos:
        for piece, spans in (
            (_encode(tokenizer, format_input(task, demo)), inputs),
            (_encode(tokenizer, _label_word(task, demo)), labels),
            (sep, seps),
        ):
            spans.append((len(tokens), len(tokens) + len(piece)))
            tokens.extend(piece)
    return tokens, inputs, labels, seps


def build_prompt(
    task: TaskSpec,
    tokenizer: Tokenizer,
    query: Example,
    demos: Sequence[Example] = (),
    *,
    prepend_bos: bool = True,
    record: str = "label",
) -> Prompt:
    """``[BOS] (demo_input demo_label SEP)* query_input FIRST_LABEL`` with exact spans.

    ``record="label"`` (reference) records at the appended label token; ``record="predict"``
    records at the query's last token, where predictions are read.
    """
    if record not in RECORD_MODES:
        raise ValueError(f"record must be one of {RECORD_MODES}, got {record!r}")
    tokens, inputs, labels, seps = build_prefix(task, tokenizer, demos, prepend_bos=prepend_bos)
    q = _encode(tokenizer, format_input(task, query))
    if not q:
        raise ValueError(f"query {query.id!r} encodes to no tokens; check the template and text")
    query_span = (len(tokens), len(tokens) + len(q))
    tokens = tokens + q + label_token_ids(task, tokenizer)[:1]
    predict_pos = len(tokens) - 2
    spans = PromptSpans(
        bos=0 if prepend_bos else None,
        demo_inputs=inputs,
        demo_labels=labels,
        separators=seps,
        query=query_span,
        predict_pos=predict_pos,
        record_pos=len(tokens) - 1 if record == "label" else predict_pos,
    )
    return Prompt(
        tokens=tokens,
        spans=spans,
        label=query.label,
        example_id=query.id,
        n_demos=len(demos),
        demo_ids=tuple(d.id for d in demos),
        record=record,
    )


def build_train_sequence(
    task: TaskSpec, tokenizer: Tokenizer, demo: Example, prepend_bos: bool = True
) -> list[int]:
    """``[BOS] input label_word`` for the K/V finetune (LM loss over all its tokens)."""
    return (
        _bos(tokenizer, prepend_bos)
        + _encode(tokenizer, format_input(task, demo))
        + _encode(tokenizer, _label_word(task, demo))
    )


def check_context(prompt_or_len: Prompt | Sequence[int] | int, n_ctx: int) -> None:
    """Raise a one-line error if a prompt (or length) exceeds the model's context."""
    n = prompt_or_len if isinstance(prompt_or_len, int) else len(prompt_or_len)
    if n > n_ctx:
        raise ValueError(
            f"prompt has {n} tokens but the model's context is {n_ctx}; use fewer "
            "demonstrations (n_demos=...) or shorter examples"
        )


class ContextWarning(UserWarning):
    """Demonstrations were dropped so that every prompt fits the model's context."""


class DemoFit(NamedTuple):
    """Result of :func:`fit_demos`: the kept demos, how many were dropped, longest prompt."""

    demos: list[Example]
    n_dropped: int
    longest: int


def fit_demos(
    task: TaskSpec,
    tokenizer: Tokenizer,
    demos: Sequence[Example],
    queries: Sequence[Example],
    n_ctx: int,
    *,
    prepend_bos: bool = True,
) -> DemoFit:
    """Drop demos from the end until the longest query's prompt fits ``n_ctx`` (as the reference).

    Dropping warns (:class:`ContextWarning`: how many of how many, and the context size);
    raises if even the zero-demo prompt of the longest query does not fit.
    """
    if not queries:
        raise ValueError("fit_demos needs at least one query example")
    longest_query = max(len(_encode(tokenizer, format_input(task, q))) for q in queries) + 1
    sep = len(_encode(tokenizer, task.separator))
    demo_lens = [
        len(_encode(tokenizer, format_input(task, d)))
        + len(_encode(tokenizer, _label_word(task, d)))
        + sep
        for d in demos
    ]
    base = len(_bos(tokenizer, prepend_bos)) + longest_query
    kept = len(demos)
    while kept and base + sum(demo_lens[:kept]) > n_ctx:
        kept -= 1
    longest = base + sum(demo_lens[:kept])
    check_context(longest, n_ctx)
    if kept < len(demos):
        warn(
            f"dropped {len(demos) - kept} of {len(demos)} demonstrations (kept the first "
            f"{kept}) so that the longest prompt, {longest} tokens, fits the model's context of "
            f"{n_ctx} tokens; use fewer demonstrations or shorter examples to keep them all",
            ContextWarning,
        )
    return DemoFit(list(demos[:kept]), len(demos) - kept, longest)
