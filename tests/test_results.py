"""results: markdown tables, and the README's reference table equals the committed results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from icl_lens.results import (
    PER_SEED_FORMATS,
    Results,
    RunResult,
    atomic_write_json,
    content_checksum,
    per_seed_table,
    readme_tables,
    to_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- reference-tables:start -->", "<!-- reference-tables:end -->"


def _run(task: str, seed: int, acc: dict[str, float], simaou: float) -> RunResult:
    rows = [
        {"task": task, "model": "m", "seed": seed, "metric": "accuracy", "variant": v,
         "kind": "result", "layer": "mean", "value": x, "ci_low": None, "ci_high": None,
         "n": 10, "lr": None}
        for v, x in acc.items()
    ]  # fmt: skip
    rows.append({**rows[0], "metric": "simaou", "variant": "ft", "value": simaou})
    return RunResult(task, seed, rows, {"seed": seed}, {})


def test_to_markdown_formats_cells_and_rows():
    table = pd.DataFrame(
        {"a": [1.23456, np.nan, -0.0004], "b": ["x", 2.0, "p|q"]}, index=["r1", "r2", "r3"]
    )
    table.index.name = "name"
    assert to_markdown(table, 2, {"r2": 0}).splitlines() == [
        "| name | a | b |",
        "|---|---|---|",
        "| r1 | 1.23 | x |",
        "| r2 | – | 2 |",
        "| r3 | 0.00 | p\\|q |",
    ]


def test_readme_tables_are_means_over_seeds_and_list_every_seed():
    res = Results([
        _run("sst2", 0, {"zs": 0.5, "icl": 0.6, "ft": 0.7}, 0.1),
        _run("sst2", 1, {"zs": 0.5, "icl": 0.8, "ft": 0.9}, 0.3),
    ])  # fmt: skip
    text = readme_tables(res)
    assert "| mean over seeds | sst2 (2 seeds) |" in text
    assert "| ICL acc | 70.0 |" in text  # (60 + 80) / 2
    assert "| SimAOU | 0.200 |" in text
    assert "| sst2 seed 0 | 50.0 | 60.0 | 70.0 | – | 0.100 | – |" in text
    assert "| sst2 seed 1 | 50.0 | 80.0 | 90.0 | – | 0.300 | – |" in text


def test_per_seed_table_reads_the_chosen_lr_from_provenance():
    run = _run("mr", 3, {"zs": 0.25, "icl": 0.5, "ft": 0.75}, 0.2)
    run.provenance["lr"] = 1e-3
    table = per_seed_table(Results([run]))
    assert table.loc["mr seed 3", "FT lr"] == 1e-3
    assert table.loc["mr seed 3", "ICL %"] == 50.0
    assert np.isnan(table.loc["mr seed 3", "Kendall"])
    row = to_markdown(table, col_formats=PER_SEED_FORMATS).splitlines()[2]
    assert row == "| mr seed 3 | 25.0 | 50.0 | 75.0 | 0.001 | 0.200 | – | – | – | – | – |"


def test_readme_reference_tables_match_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    if START not in readme:
        pytest.skip("the README has no reference tables yet (the reference run is not complete)")
    found = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), readme, re.S)
    assert found, f"README has {START} but no {END} after it"
    quoted = found.group(1)
    results = Results.load(ROOT / "results" / "reference" / "gemma-3-270m")
    assert quoted.strip() == readme_tables(results).strip()


def test_make_tables_script_writes_the_marked_readme_block(tmp_path):
    saved = Results([_run("sst2", 0, {"zs": 0.5, "icl": 0.6, "ft": 0.7}, 0.1)]).save(
        tmp_path / "r.json"
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nstale table\n{END}\noutro\n")
    script = str(ROOT / "analyses" / "make_tables.py")
    run = [sys.executable, script, str(saved), "--readme", str(readme)]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    block = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, re.S).group(1)
    assert block == readme_tables(Results.load(saved)).strip()
    readme.write_text("no markers here\n")
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "add the two markers" in proc.stderr
    assert readme.read_text() == "no markers here\n"  # nothing lost


# --------------------------------------------------------------------------- checksums


def _write_run(path: Path, run: RunResult) -> Path:
    atomic_write_json(path, run.to_json())
    return path


def _tamper(path: Path, old: str = '"value": 0.75', new: str = '"value": 0.87') -> None:
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))


def test_run_files_carry_a_checksum_that_round_trips(tmp_path):
    run = _run("sst2", 0, {"zs": 0.5, "icl": 0.6, "ft": 0.75}, 0.1)
    run.diagnostics = {"by_k": {10: 1.0, 2: 0.5}, "shape": (3, 4)}  # int keys, tuples
    path = _write_run(tmp_path / "sst2" / "seed0.json", run)
    obj = json.loads(path.read_text())
    assert obj["checksum"].startswith("sha256:") and len(obj["checksum"]) == 7 + 64
    assert obj["checksum"] == content_checksum(obj)
    loaded = Results.load(path, require_checksum=True)
    assert loaded.to_frame().equals(Results([run]).to_frame())
    assert Results.load(tmp_path, require_checksum=True).to_frame().equals(loaded.to_frame())
    twice = _write_run(tmp_path / "twice.json", run)  # the same run gives the same bytes
    assert twice.read_bytes() == path.read_bytes()
    again = _write_run(tmp_path / "again.json", loaded.runs[0])  # keys now "10", "2": same sum
    assert json.loads(again.read_text())["checksum"] == obj["checksum"]
    saved = Results([run, _run("mr", 1, {"zs": 0.5}, 0.2)]).save(tmp_path / "all.json")
    assert json.loads(saved.read_text())["checksum"] == content_checksum(
        json.loads(saved.read_text())
    )
    assert len(Results.load(saved, require_checksum=True)) == 2


@pytest.mark.parametrize("layout", ["run file", "directory", "saved results"])
def test_a_tampered_results_file_raises_on_load(tmp_path, layout):
    run = _run("sst2", 0, {"zs": 0.5, "icl": 0.6, "ft": 0.75}, 0.1)
    if layout == "saved results":
        path = Results([run]).save(tmp_path / "all.json")
    else:
        path = _write_run(tmp_path / "sst2" / "seed0.json", run)
    Results.load(path)  # fine before
    _tamper(path)  # 75% -> 87% FT accuracy, checksum left alone
    with pytest.raises(ValueError, match="edited or corrupted") as err:
        Results.load(tmp_path if layout == "directory" else path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_files_without_a_checksum_load_for_reading_only(tmp_path):
    obj = _run("sst2", 0, {"zs": 0.5, "icl": 0.6, "ft": 0.75}, 0.1).to_json()
    del obj["checksum"]
    path = tmp_path / "seed0.json"
    path.write_text(json.dumps(obj))
    assert Results.load(path).runs[0].rows[2]["value"] == 0.75
    with pytest.raises(ValueError, match="has no checksum") as err:
        Results.load(path, require_checksum=True)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    committed = ROOT / "results" / "reference" / "gemma-3-270m"
    if committed.is_dir():  # written before checksums: still readable for tables and figures
        assert len(Results.load(committed)) > 0


def test_results_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_results_render_as_html_with_the_reasons_for_undefined_values():
    a = _run("sst2", 0, {"zs": 0.5, "icl": 0.75}, 0.2)
    a.rows.append({**a.rows[0], "metric": "rec2ftp", "variant": "", "value": None,
                   "note": "undefined: no ZS-wrong example"})  # fmt: skip
    res = Results([a, _run("sst2", 1, {"zs": 0.5, "icl": 0.25}, 0.4)])
    assert repr(res) == "<Results: 2 runs · model m · tasks sst2 · seeds [0, 1]>"
    page = res._repr_html_()
    assert "<table" in page and "50.000" in page  # ICL accuracy: mean of 75% and 25%
    assert "0.300" in page  # SimAOU: mean over seeds
    assert "undefined" in page and "no ZS-wrong example" in page
    assert list(res.undefined()["metric"]) == ["rec2ftp"]
    assert "no rows" in Results()._repr_html_()
    # a metric reported per layer only (patching) shows its undefined per-layer rows
    a.rows.append({**a.rows[0], "metric": "patch_survival", "variant": "icl_to_ft:ft",
                   "layer": "1", "value": None, "note": "base change is 0"})  # fmt: skip
    a.rows.append({**a.rows[0], "metric": "simaou", "layer": "1", "value": None, "note": "x"})
    assert list(Results([a]).undefined()["metric"]) == ["rec2ftp", "patch_survival"]
