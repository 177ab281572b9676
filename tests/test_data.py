"""Data sources (HF, StaICC, CSV/JSONL), the safe unpickler, carving and demo sampling."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import icl_lens.data as data
from icl_lens.data import (
    OFFLINE_HINT,
    UnsafePickleError,
    load_file,
    load_task_data,
    read_staicc_file,
    read_table,
    safe_unpickle,
    sample_demos,
)
from icl_lens.tasks import TASKS, Example

FIXTURES = Path(__file__).parent / "fixtures"


def write_pickle(path: Path, obj: object, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def toy_records(n: int, n_labels: int = 2) -> list[tuple[list[str], int]]:
    return [([f" text number {i} "], i % n_labels) for i in range(n)]


# --------------------------------------------------------------------------- safe unpickling


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_staicc_loader_refuses_code_execution(tmp_path, protocol):
    target = tmp_path / "pwned"
    bad = write_pickle(tmp_path / "sst2.dataset", [(["hi"], 0), _Evil(target)], protocol)
    with pytest.raises(UnsafePickleError) as err:
        load_task_data("sst2", path=bad)
    assert "system" in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)
    assert not target.exists()


@pytest.mark.parametrize(
    "obj", [pickle.Pickler, {1, 2}, np.int64(3), Counter("ab")], ids=["class", "set", "np", "ctr"]
)
def test_safe_unpickle_refuses_any_global(obj):
    blob = pickle.dumps(obj, protocol=2)  # protocol 2 pickles all of these via globals
    with pytest.raises(UnsafePickleError):
        safe_unpickle(blob)


def test_safe_unpickle_accepts_plain_data_and_rejects_garbage():
    obj = [(["a", "b"], 1), {"k": [1.5, None, True, -7]}]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert safe_unpickle(pickle.dumps(obj, protocol=protocol)) == obj
    with pytest.raises(ValueError, match="not a readable pickle"):
        safe_unpickle(pickle.dumps(obj)[:-5])


def test_read_staicc_file_accepts_well_formed(tmp_path):
    records = toy_records(10)
    assert read_staicc_file(write_pickle(tmp_path / "ok.dataset", records)) == records


@pytest.mark.parametrize(
    "obj",
    [{"a": 1}, [("text", 0)], [(["t"], "pos")], [(["t"], True)], [([], 0)], [(["t"], 0, 1)]],
)
def test_read_staicc_file_validates_structure(tmp_path, obj):
    with pytest.raises(ValueError, match="expected") as err:
        read_staicc_file(write_pickle(tmp_path / "bad.dataset", obj))
    assert not isinstance(err.value, UnsafePickleError)


def test_staicc_carving_on_a_small_file(tmp_path):
    records = toy_records(20) + [([" text number 3 "], 1)]  # index 20 duplicates index 3
    path = write_pickle(tmp_path / "mini.dataset", records)
    d = load_task_data("sst2", path=path, n_eval=None)
    perm = np.random.default_rng(1).permutation(21)
    eval_ids = [str(i) for i in perm[:10]]
    assert [e.id for e in d.eval] == eval_ids
    dup = int(("3" in eval_ids) != ("20" in eval_ids))  # one copy in eval, one in the demo pool
    assert d.provenance["n_demo_dropped_duplicates"] == dup == 1
    assert len(d.demo_pool) == 11 - dup
    assert [int(e.id) for e in d.demo_pool] == sorted(int(e.id) for e in d.demo_pool)
    assert d.eval[0].fields["x"] == records[perm[0]][0][0].strip()
    assert not {e.fields["x"] for e in d.eval} & {e.fields["x"] for e in d.demo_pool}
    assert load_task_data("sst2", path=path, n_eval=3).eval == d.eval[:3]


def test_empty_data_errors(tmp_path):
    with pytest.raises(ValueError, match="no examples"):
        load_task_data("sst2", path=write_pickle(tmp_path / "empty.dataset", []))
    with pytest.raises(ValueError, match="no evaluation examples"):
        load_task_data("sst2", path=write_pickle(tmp_path / "one.dataset", toy_records(1)))
    with pytest.raises(ValueError, match="n_eval must be positive"):
        load_task_data(
            "sst2", path=write_pickle(tmp_path / "ten.dataset", toy_records(10)), n_eval=0
        )


def test_label_out_of_range(tmp_path):
    path = write_pickle(tmp_path / "x.dataset", toy_records(10, n_labels=3))
    with pytest.raises(ValueError, match="outside 0..1"):
        load_task_data("sst2", path=path)


def test_missing_staicc_package(monkeypatch):
    monkeypatch.setattr(data, "find_spec", lambda name: None)
    with pytest.raises(ImportError) as err:
        load_task_data("sst2")
    assert str(err.value) == OFFLINE_HINT


def test_cb_not_offline():
    with pytest.raises(ValueError, match="source='hf'"):
        load_task_data("cb", source="staicc")


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown source"):
        load_task_data("sst2", source="kaggle")


STAICC = {  # name -> (n_total, labels)
    "sst2": (67_349, {0, 1}),
    "sst5": (8_544, {0, 1, 2, 3, 4}),
    "mr": (8_530, {0, 1}),
    "subj": (8_000, {0, 1}),
    "agnews": (127_600, {0, 1, 2, 3}),
}


@pytest.mark.parametrize("name", list(STAICC))
def test_real_staicc(name):
    pytest.importorskip("StaICC")
    d = load_task_data(name)
    n_total, labels = STAICC[name]
    p = d.provenance
    assert p["n_total"] == n_total and p["source"] == d.source == "staicc"
    assert len(d.eval) == p["n_eval"] == 2000
    assert len(d.demo_pool) == n_total - 2000 - p["n_demo_dropped_duplicates"]
    eval_ids, demo_ids = {e.id for e in d.eval}, {e.id for e in d.demo_pool}
    assert len(eval_ids) == 2000 and not eval_ids & demo_ids
    assert not {e.fields["x"] for e in d.eval} & {e.fields["x"] for e in d.demo_pool}
    assert {e.label for e in d.demo_pool} == labels
    assert all(isinstance(e.id, str) and e.id.isdigit() for e in d.eval[:50])
    assert all(e.fields["x"] == e.fields["x"].strip() for e in d.eval)
    assert len(p["sha256"]) == 64 and p["seeds"] == {"carve": 1}


def test_real_staicc_sst2_details():
    pytest.importorskip("StaICC")
    d = load_task_data("sst2", n_eval=100)
    assert len(d.eval) == 100 and d.provenance["n_eval_pool"] == 2000
    assert d.provenance["n_demo_dropped_duplicates"] > 0  # GLUE train repeats phrases
    full = load_task_data("sst2")
    assert full.eval[:100] == d.eval and full.demo_pool == d.demo_pool
    perm = np.random.default_rng(1).permutation(67_349)
    assert [e.id for e in d.eval] == [str(i) for i in perm[:100]]


# --------------------------------------------------------------------------- Hugging Face


def hf_split(n: int, text_col: str = "sentence", offset: int = 0, n_labels: int = 2):
    return datasets.Dataset.from_dict(
        {
            text_col: [f"row {i + offset} " for i in range(n)],
            "label": [i % n_labels for i in range(n)],
        }
    )


def test_hf_injected_dataset_shuffle_and_cap():
    dd = datasets.DatasetDict(validation=hf_split(2500), train=hf_split(40, offset=10_000))
    d = load_task_data("sst2", source="hf", dataset=dd, n_eval=None)
    expected = dd["validation"].shuffle(seed=1)["sentence"][:2000]
    assert [e.fields["x"] for e in d.eval] == [t.strip() for t in expected]
    assert d.eval[0].id == f"validation:{np.random.default_rng(1).permutation(2500)[0]}"
    assert [e.id for e in d.demo_pool] == [f"train:{i}" for i in range(40)]
    assert d.provenance["splits"] == {"eval": "validation", "demo": "train"}
    assert d.provenance["dataset"] == "glue/sst2" and d.source == "hf"
    small = load_task_data("sst2", source="hf", dataset=dd, n_eval=5)
    assert small.eval == d.eval[:5]
    assert len(load_task_data("sst2", source="hf", dataset=dd).eval) == 2000


def test_hf_drops_unlabelled_and_duplicates():
    val = datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, -1, 1]})
    train = datasets.Dataset.from_dict({"sentence": ["a ", "d", "e"], "label": [0, 1, -1]})
    d = load_task_data("sst2", source="hf", dataset={"validation": val, "train": train})
    assert {e.fields["x"] for e in d.eval} == {"a", "c"}
    assert [e.fields["x"] for e in d.demo_pool] == ["d"]
    assert d.provenance["n_dropped_unlabelled"] == 2
    assert d.provenance["n_demo_dropped_duplicates"] == 1


EXPECTED_HF = {
    "sst2": ("glue", "sst2", "validation"),
    "sst5": ("SetFit/sst5", None, "validation"),
    "mr": ("rotten_tomatoes", None, "validation"),
    "subj": ("SetFit/subj", None, "test"),
    "agnews": ("ag_news", None, "test"),
    "cb": ("super_glue", "cb", "validation"),
}


@pytest.mark.parametrize("name", list(EXPECTED_HF))
def test_hf_requests_official_ids(monkeypatch, name):
    task = TASKS[name]
    calls = []

    def fake_load(path, hf_name, split):
        calls.append((path, hf_name, split))
        cols = {c: [f"{c} {split} {i}" for i in range(6)] for c in task.hf_text_columns}
        return datasets.Dataset.from_dict({**cols, "label": [i % task.n_labels for i in range(6)]})

    monkeypatch.setattr(data, "_hf_load", fake_load)
    d = load_task_data(name, source="hf")
    path, hf_name, split = EXPECTED_HF[name]
    assert calls == [(path, hf_name, split), (path, hf_name, "train")]
    assert len(d.eval) == 6 and len(d.demo_pool) == 6
    assert set(d.eval[0].fields) == set(task.text_fields)


def test_hf_single_dataset_is_carved():
    d = load_task_data("mr", source="hf", dataset=hf_split(30, "text"))
    assert len(d.eval) == 15 and len(d.demo_pool) == 15
    assert not {e.id for e in d.eval} & {e.id for e in d.demo_pool}


def test_hf_missing_split_names_fix():
    with pytest.raises(ValueError, match=r"lacks splits \['train'\]"):
        load_task_data("sst2", source="hf", dataset={"validation": hf_split(4)})


def test_hf_missing_column_lists_available():
    dd = {"validation": hf_split(4, "review"), "train": hf_split(4, "review")}
    with pytest.raises(ValueError, match=r"missing columns \['sentence'\]; available: \['review'"):
        load_task_data("sst2", source="hf", dataset=dd)


# --------------------------------------------------------------------------- files


def test_load_csv_with_split_column_and_string_labels():
    d = load_file(
        FIXTURES / "reviews.csv", "review", "sentiment", "Review: {x} Sentiment:",
        (" Negative", " Positive"), labels=["negative", "positive"], split_column="split",
    )  # fmt: skip
    assert d.task.name == "reviews" and d.task.text_fields == ("x",) and d.source == "file"
    assert sorted(int(e.id) for e in d.eval) == [6, 7, 8, 9]
    assert [e.id for e in d.demo_pool] == [str(i) for i in range(6)]
    assert d.demo_pool[0] == Example("0", {"x": "A warm, funny film."}, 1)
    assert d.provenance["n_total"] == 10
    assert d.provenance["splits"] == {"column": "split", "eval": "eval", "demo": "train"}
    assert d.provenance["columns"] == {"text": ["review"], "label": "sentiment", "split": "split"}
    assert d.provenance["labels"] == ["negative", "positive"]


def test_load_jsonl_with_eval_fraction():
    d = load_file(FIXTURES / "reviews.jsonl", ["review"], "label", "{review} =>", (" no", " yes"))
    assert d.task.text_fields == ("review",) and len(d.eval) == 5 and len(d.demo_pool) == 5
    perm = np.random.default_rng(1).permutation(10)
    assert [e.id for e in d.eval] == [str(i) for i in perm[:5]]
    assert (
        load_file(
            FIXTURES / "reviews.jsonl", "review", "label", "{x}", (" no", " yes"), eval_fraction=0.3
        ).provenance["n_eval"]
        == 3
    )


def test_load_task_data_file_source():
    d = load_task_data("mr", source="file", path=FIXTURES / "reviews.jsonl", text_columns="review")
    assert d.task is TASKS["mr"] and len(d.eval) == 5


def test_file_errors(tmp_path):
    csv = FIXTURES / "reviews.csv"
    words = (" Negative", " Positive")
    with pytest.raises(ValueError) as err:
        load_file(csv, "text", "sentiment", "{x}", words)
    assert str(err.value).endswith("available: ['review', 'sentiment', 'split']")
    with pytest.raises(ValueError, match="pass labels="):
        load_file(csv, "review", "sentiment", "{x}", words)
    with pytest.raises(ValueError, match=r"not in labels"):
        load_file(csv, "review", "sentiment", "{x}", words, labels=["negative", "neutral"])
    empty = tmp_path / "empty.csv"
    empty.write_text("review,label\n")
    with pytest.raises(ValueError, match="no rows"):
        load_file(empty, "review", "label", "{x}", words)
    tiny = tmp_path / "tiny.csv"
    pd.DataFrame({"review": ["only one"], "label": [0]}).to_csv(tiny, index=False)
    with pytest.raises(ValueError, match="no evaluation examples"):
        load_file(tiny, "review", "label", "{x}", words)
    with pytest.raises(ValueError, match="unsupported file type"):
        load_file(tmp_path / "x.parquet", "review", "label", "{x}", words)
    with pytest.raises(ValueError, match="template fields"):
        load_file(csv, ["review", "split"], "sentiment", "{x}", words)


def test_csv_texts_such_as_na_are_texts(tmp_path):
    """pandas reads NA, null, nan, N/A... as missing values; a text is what is written."""
    path = tmp_path / "na.csv"
    words = ["NA", "null", "nan", "N/A", "None", "007", "1.50", "-", "n/a", "#N/A"]
    path.write_text("text,label\n" + "".join(f"{w},{i % 2}\n" for i, w in enumerate(words)))
    d = load_file(path, "text", "label", "{x}", (" no", " yes"))
    by_text = {e.fields["x"]: e.label for e in [*d.eval, *d.demo_pool]}
    assert by_text == {w: i % 2 for i, w in enumerate(words)}
    assert read_table(path, ["text"])["text"].tolist() == words


def test_empty_cells_name_their_rows(tmp_path):
    csv = tmp_path / "blank.csv"
    csv.write_text("text,label\na,0\n,1\nc,0\n   ,1\n")
    with pytest.raises(ValueError, match=r"2 empty cells in column 'text' \(rows 1, 3, counting"):
        load_file(csv, "text", "label", "{x}", (" no", " yes"))
    jsonl = tmp_path / "null.jsonl"
    jsonl.write_text('{"text": "a", "label": 0}\n{"text": null, "label": 1}\n')
    with pytest.raises(ValueError, match=r"1 empty cell in column 'text' \(rows 1,.* that row"):
        load_file(jsonl, "text", "label", "{x}", (" no", " yes"))


def test_empty_and_unreadable_files_name_the_file_and_the_fix(tmp_path):
    for name in ("empty.csv", "empty.jsonl"):
        (tmp_path / name).write_text("\n")
        with pytest.raises(ValueError, match=rf"{name}: the file is empty; write "):
            load_file(tmp_path / name, "text", "label", "{x}", (" no", " yes"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: not readable as JSON lines"):
        load_file(bad, "text", "label", "{x}", (" no", " yes"))
    with pytest.raises(FileNotFoundError, match="missing.csv: no such file"):
        load_file(tmp_path / "missing.csv", "text", "label", "{x}", (" no", " yes"))


def test_labels_map_integer_values_too():
    """With ``labels``, every label value (integers included) is looked up in it: the file's
    1 = positive is label-word 0 when labels=[1, 0]."""
    d = load_file(FIXTURES / "reviews.jsonl", "review", "label", "{x}", (" yes", " no"),
                  labels=[1, 0])  # fmt: skip
    by_text = {e.fields["x"]: e.label for e in [*d.eval, *d.demo_pool]}
    assert by_text["A warm, funny film."] == 0 and by_text["Dull and far too long."] == 1
    d = load_file(FIXTURES / "reviews.jsonl", "review", "label", "{x}", (" no", " yes"),
                  labels=["0", "1"])  # fmt: skip
    assert {e.fields["x"]: e.label for e in d.demo_pool + d.eval}["A warm, funny film."] == 1


# --------------------------------------------------------------------------- demos


POOL = [Example(str(i), {"x": f"t{i}"}, i % 3) for i in range(30)]


def test_sample_demos_reference_and_determinism():
    demos = sample_demos(POOL, 5, seed=7)
    assert demos == [POOL[i] for i in np.random.default_rng(7).permutation(30)[:5]]
    assert sample_demos(POOL, 5, seed=7) == demos and sample_demos(POOL, 5, seed=8) != demos
    assert sample_demos(POOL, 0, seed=7) == []
    with pytest.raises(ValueError, match="k=31"):
        sample_demos(POOL, 31, seed=0)


def test_balanced_impossible():
    skewed = POOL[:10] + [Example("x", {"x": "y"}, 5)]
    with pytest.raises(ValueError, match="balanced=False"):
        sample_demos(skewed, 8, seed=0, balanced=True)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=40),
    k=st.integers(0, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_balanced_counts_differ_by_at_most_one(labels, k, seed):
    pool = [Example(str(i), {"x": str(i)}, y) for i, y in enumerate(labels)]
    sizes = Counter(labels)
    base, extra = divmod(k, len(sizes))
    feasible = min(sizes.values()) >= base and sum(n > base for n in sizes.values()) >= extra
    if not feasible:
        with pytest.raises(ValueError):
            sample_demos(pool, k, seed, balanced=True)
        return
    demos = sample_demos(pool, k, seed, balanced=True)
    assert len(demos) == k == len({d.id for d in demos})
    counts = Counter(d.label for d in demos)
    per = [counts.get(c, 0) for c in sizes]
    assert max(per) - min(per) <= 1
    order = {
        e.id: r
        for r, e in enumerate(pool[i] for i in np.random.default_rng(seed).permutation(len(pool)))
    }
    assert [order[d.id] for d in demos] == sorted(order[d.id] for d in demos)
    assert sample_demos(pool, k, seed, balanced=True) == demos
