"""Task specifications (templates, label words) and prompt building with index spans.

(Skeleton: the lead wrote the dataclasses; the rest is being filled in.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSpec:
    """One classification task: how an example is rendered and which words are its labels.

    ``template`` uses ``{x}`` (single text field) or named fields such as ``{premise}``.
    ``label_words`` carry their leading space, e.g. ``(" Negative", " Positive")``.
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

    @property
    def n_labels(self) -> int:
        return len(self.label_words)


@dataclass(frozen=True)
class Example:
    """One labelled example. ``id`` is stable across runs (index in the source split)."""

    id: str
    fields: dict[str, str] = field(hash=False)
    label: int
