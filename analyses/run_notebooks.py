"""Execute the analysis notebooks and keep what they show: executed copies and their figures.

    python analyses/run_notebooks.py                      # the toy quickstart (~1 min)
    python analyses/run_notebooks.py gemma_circuit        # the Gemma-3-270m one (slow)

The notebooks in ``analyses/`` are stored without outputs (tests check that). This runs each
in a kernel of this Python, from the repository root, and writes
``analyses/executed/NAME.ipynb`` (with outputs) and every figure it displays as
``figures/notebooks/NAME-K.png`` (K counts the figures in order), so that the committed
figures are exactly what the committed notebook drew.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, timeout: int) -> None:
    import nbclient
    import nbformat
    from ipykernel.kernelspec import install

    src = ROOT / "analyses" / f"{name}.ipynb"
    nb = nbformat.read(str(src), as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        install(kernel_name="icl-lens-run", prefix=tmp)
        os.environ["JUPYTER_PATH"] = str(Path(tmp) / "share" / "jupyter")
        os.environ.setdefault("MPLBACKEND", "Agg")
        os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        client = nbclient.NotebookClient(nb, kernel_name="icl-lens-run", timeout=timeout,
                                         resources={"metadata": {"path": str(ROOT)}})  # fmt: skip
        start = time.perf_counter()
        client.execute()
        elapsed = time.perf_counter() - start
    out = ROOT / "analyses" / "executed" / f"{name}.ipynb"
    out.parent.mkdir(exist_ok=True)
    nbformat.write(nb, str(out))
    figs = ROOT / "figures" / "notebooks"
    figs.mkdir(parents=True, exist_ok=True)
    for old in figs.glob(f"{name}-*.png"):
        old.unlink()
    k = 0
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            png = o.get("data", {}).get("image/png")
            if png:
                k += 1
                (figs / f"{name}-{k}.png").write_bytes(base64.b64decode(png))
    print(f"{name}: ran in {elapsed:.0f}s with {sys.executable}; wrote {out.relative_to(ROOT)} "
          f"and {k} figures in {figs.relative_to(ROOT)}/")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=["quickstart"])
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = ap.parse_args()
    for name in args.names:
        run(name, args.timeout)


if __name__ == "__main__":
    main()
