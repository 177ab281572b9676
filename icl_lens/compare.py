"""Does a run reproduce the reference run? Headline numbers side by side, within their CIs.

``compare(run, reference)`` lines up every headline value (the metrics and baselines of
``results.SUMMARY_COLUMNS``, layer ``"mean"``) of two results directories (or ``Results``), per
task and seed, and decides for each whether this run reproduces the reference's number.
``report(frame)`` renders the comparison as text; ``icl-lens compare RUN_DIR [REFERENCE_DIR]``
prints it.

**The rule.** For one task, seed and headline value, with ``diff = run - reference``::

    within  <=>  |diff| <= tolerance = hw_run + hw_ref     (+ 1e-9 relative, for rounding)

where ``hw`` is that seed's 95% bootstrap CI half-width, ``(ci_high - ci_low) / 2``, read from
each side's file: roughly, the two CIs overlap. A lenient test, meant to catch a changed
number, not a hair's-breadth shift. A value stored without a CI (Rec2FTP's chance level, for
one) borrows its side's spread over seeds (sample standard deviation, one value per seed) as its
half-width; a side with neither takes the other side's half-width; with none on both sides the
values must be equal (up to rounding). A value undefined (NaN) on both sides reproduces; undefined
on one side only does not.

The **mean over seeds** (row ``seed == "mean"``) is compared over the seeds both sides share,
with each side's half-width ``sqrt(sum_i hw_i^2) / k`` for the ``k`` seeds (independent seeds;
with the seeds' spread this is the standard error). When the two sides share no seed, each mean
is over its own seeds and its half-width is the seeds' standard error (one seed: its CI
half-width), since the demonstrations then differ.

**Not compared.** A value missing on one side (a task, seed or baseline that was not run) is
noted ``"missing in run"`` / ``"missing in reference"`` (a value at the other recording site,
absent from results made before those sites were recorded, says so), and one whose (task,
seed) runs differ in model, data file, config (``config_key``; the list of seeds run and the
fast-path switches are ignored, they do not change a seed's numbers) or evaluation/demonstration
ids is noted
``"not comparable: ..."``: its ``within`` is NA (pandas' nullable boolean), never False. Only
``within == False`` is a value that does not reproduce. A different chosen FT learning rate is
not a different config (the protocol chooses it) but is noted, since it explains differing FT
numbers. ``reproduces`` (and ``icl-lens compare --strict``, exit 1 otherwise) needs something
compared and no False.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icl_lens.results import SUMMARY_COLUMNS, Results

VERSION_KEYS = ("icl_lens", "icl_lens_git", "backend", "transformer_lens", "transformers", "torch")
# config fields that do not change a seed's headline numbers: the seeds run, the fast-path
# controls, and the opt-in patching (it only adds rows)
_CONFIG_IGNORED = ("seeds", "shared_prefix", "self_checks", "patching", "patch_examples")
# fields added later, and what a file without them ran with (older files ran fp32 on the CPU,
# reported every layer, no patching); experiment._KEY_DEFAULTS must be a subset (a test says so)
_CONFIG_DEFAULTS = {"dtype": "float32", "device": "cpu", "layers": None, "patching": False,
                    "patch_examples": 64, "ft_train_dtype": "float32",
                    "update_capture_dtype": "float32"}  # fmt: skip
_HEADLINE = {(m, v): name for m, v, name in SUMMARY_COLUMNS}
# headline metrics at the other recording sites (experiment.SITES): results made before those
# were recorded lack them, which is noted as such, not as a difference
_OTHER_SITE_METRICS = {m for m, _, _ in SUMMARY_COLUMNS if m.endswith(("_attention", "_q_post"))}
_BEFORE_SITES = " (made before the other recording sites were recorded)"
_ORDER = {(m, v): i for i, (m, v, _) in enumerate(SUMMARY_COLUMNS)}
FRAME_COLUMNS = [
    "task",
    "seed",
    "metric",
    "variant",
    "name",
    "run",
    "reference",
    "diff",
    "tolerance",
    "within",
    "note",
]
_RTOL = 1e-9


def reference_candidates(model_dir: str) -> list[Path]:
    """Where the committed reference run of ``model_dir`` may live in the source checkout:
    ``results/reference/<model_dir>``, then its former place ``results/<model_dir>``."""
    root = Path(__file__).resolve().parent.parent / "results"
    return [root / "reference" / model_dir, root / model_dir]


def default_reference(run_dir: str | Path, run: Results | None = None) -> Path:
    """The committed reference run for the model of ``run_dir``; FileNotFoundError if none.

    The model directory's name is the run's model (``/`` as ``--``, as ``reproduce`` writes it),
    else ``run_dir``'s own name. A candidate that is ``run_dir`` itself is skipped (a fresh
    ``icl-lens reproduce`` writes to ``./results/<model>``, the reference's former place).
    """
    run_dir = Path(run_dir)
    names = []
    if run is not None:
        names += sorted({str(r.provenance.get("model") or "") for r in run.runs} - {""})
    names = [n.replace("/", "--") for n in names] + [run_dir.resolve().name]
    tried = []
    for name in dict.fromkeys(names):
        for path in reference_candidates(name):
            tried.append(path)
            if path.is_dir() and path.resolve() != run_dir.resolve():
                return path
    shown = ", ".join(str(p) for p in tried)
    raise FileNotFoundError(
        f"compare: no reference run found for {run_dir} (looked in {shown}); "
        "pass it as REFERENCE_DIR: icl-lens compare RUN_DIR REFERENCE_DIR"
    )


def load_side(source: str | Path | Results, what: str = "run") -> tuple[Results, str]:
    """``source`` as ``Results`` and a label; one-line errors for missing or unreadable files."""
    if isinstance(source, Results):
        return source, f"<{what}: Results>"
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"compare: no such {what} results directory: {path}")
    try:
        res = Results.load(path)
    except (KeyError, TypeError) as e:
        raise ValueError(f"compare: {path} holds a malformed results file ({e!r})") from e
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"compare: cannot read {path}: {e}") from e
    return res, str(path)


def compare(
    run: str | Path | Results,
    reference: str | Path | Results,
    *,
    run_label: str | None = None,
    reference_label: str | None = None,
) -> pd.DataFrame:
    """This run's headline values beside the reference's, per task and seed, and their means.

    Returns one row per (task, seed, metric, variant) for every seed on either side plus one
    ``seed == "mean"`` row per (task, metric, variant), with columns ``FRAME_COLUMNS``: ``run``
    and ``reference`` values (in the results files' units: accuracies as fractions, Rec2FTP in
    percent), ``diff = run - reference``, ``tolerance`` and ``within`` as in the module's rule,
    and a ``note``. ``frame.attrs`` holds both sides' labels, versions, seeds and provenance
    differences, for ``report``; the labels name the two sides there (default: their paths).
    """
    run_res, label = load_side(run, "run")
    run_label = run_label or label
    ref_res, label = load_side(reference, "reference")
    ref_label = reference_label or label
    sides = {"run": _side(run_res, run_label), "reference": _side(ref_res, ref_label)}
    a, b = sides["run"], sides["reference"]

    pairs = sorted(set(a["prov"]) | set(b["prov"]))
    provenance_notes = {}
    lr_notes = {}
    for key in sorted(set(a["prov"]) & set(b["prov"])):
        why = _provenance_difference(a["prov"][key], b["prov"][key])
        if why:
            provenance_notes[key] = why
        lr_a, lr_b = a["prov"][key].get("lr"), b["prov"][key].get("lr")
        if lr_a != lr_b and lr_a is not None and lr_b is not None:
            lr_notes[key] = f"chosen FT lr {lr_a:g} vs {lr_b:g}"

    rows: list[dict[str, Any]] = []
    keys = sorted(
        {(t, m, v) for (t, _, m, v) in [*a["values"], *b["values"]]},
        key=lambda k: (k[0], _ORDER[(k[1], k[2])]),
    )
    for task, metric, variant in keys:
        seeds = sorted({s for (t, s) in pairs if t == task})
        per_seed = []
        for seed in seeds:
            row = _seed_row(a, b, task, seed, metric, variant, provenance_notes, lr_notes)
            per_seed.append(row)
        rows += per_seed
        rows.append(_mean_row(a, b, task, metric, variant, per_seed))
    frame = pd.DataFrame(rows, columns=FRAME_COLUMNS)
    frame["within"] = frame["within"].astype("boolean")
    for col in ("run", "reference", "diff", "tolerance"):
        frame[col] = frame[col].astype(float)
    frame.attrs["compare"] = {
        side: {
            "label": s["label"],
            "versions": s["versions"],
            "models": s["models"],
            "seeds": {t: sorted(x for (u, x) in s["prov"] if u == t) for t, _ in s["prov"]},
        }
        for side, s in sides.items()
    }
    frame.attrs["compare"]["provenance"] = {
        f"{t} seed {s}": why for (t, s), why in provenance_notes.items()
    }
    return frame


# --------------------------------------------------------------------------- one side


def _side(res: Results, label: str) -> dict[str, Any]:
    """A side's headline values, CI half-widths, provenance per (task, seed) and versions."""
    prov: dict[tuple[str, int], dict[str, Any]] = {}
    for r in res.runs:
        key = (str(r.task), int(r.seed))
        if key in prov:
            raise ValueError(
                f"compare: {label} holds two runs of {key[0]} seed {key[1]}; "
                "pass one model's results directory"
            )
        prov[key] = r.provenance or {}
    frame = res.to_frame()
    frame = frame[frame.layer.astype(str) == "mean"]
    frame = frame[[(m, v) in _HEADLINE for m, v in zip(frame.metric, frame.variant, strict=True)]]
    values: dict[tuple[str, int, str, str], tuple[float, float, str | None]] = {}
    for row in frame.itertuples(index=False):
        key = (str(row.task), int(row.seed), str(row.metric), str(row.variant))
        if key in values:
            continue  # first row wins, as in the summary's pivot
        hw = (row.ci_high - row.ci_low) / 2.0
        values[key] = (float(row.value), float(hw), row.note)
    spread: dict[tuple[str, str, str], float] = {}
    by_key: dict[tuple[str, str, str], list[float]] = {}
    for (t, _, m, v), (x, _, _) in values.items():
        by_key.setdefault((t, m, v), []).append(x)
    for k, xs in by_key.items():
        finite = [x for x in xs if math.isfinite(x)]
        spread[k] = float(np.std(finite, ddof=1)) if len(finite) >= 2 else math.nan
    versions = {
        k: sorted({str(p.get(k)) for p in prov.values() if p.get(k) is not None})
        for k in VERSION_KEYS
    }
    models = sorted({str(p.get("model")) for p in prov.values() if p.get("model")})
    return dict(
        label=label, prov=prov, values=values, spread=spread, versions=versions, models=models
    )


def _field(config: dict, key: str):
    """A config field, or what a file made before the field existed ran with: its default,
    except that half-precision runs trained FT and ran the ZS/FT captures in the model's
    dtype before ``ft_train_dtype`` and ``update_capture_dtype`` existed."""
    if key in config:
        return config[key]
    half_fields = ("ft_train_dtype", "update_capture_dtype")
    if key in half_fields and config.get("dtype") in ("bfloat16", "float16"):
        return "model"
    return _CONFIG_DEFAULTS.get(key)


def _provenance_difference(pa: dict[str, Any], pb: dict[str, Any]) -> str | None:
    """Why two (task, seed) runs' numbers are not comparable, or None."""
    why = []
    if pa.get("model") != pb.get("model"):
        why.append(f"different model ({pa.get('model')} vs {pb.get('model')})")
    sha_a = (pa.get("data") or {}).get("sha256")
    sha_b = (pb.get("data") or {}).get("sha256")
    if sha_a and sha_b and sha_a != sha_b:
        why.append("different data file")
    if pa.get("config_key") != pb.get("config_key"):
        ca, cb = pa.get("config"), pb.get("config")
        if isinstance(ca, dict) and isinstance(cb, dict):
            fields = sorted(
                k
                for k in set(ca) | set(cb)
                if k not in _CONFIG_IGNORED and _norm(_field(ca, k)) != _norm(_field(cb, k))
            )
            if fields:
                shown = ", ".join(f"{k} {_field(ca, k)!r} vs {_field(cb, k)!r}" for k in fields[:3])
                more = f" and {len(fields) - 3} more" if len(fields) > 3 else ""
                why.append(f"different config ({shown}{more})")
        else:
            why.append(f"different config ({pa.get('config_key')} vs {pb.get('config_key')})")
    for ids in ("eval_ids", "demo_ids"):
        xa, xb = pa.get(ids), pb.get(ids)
        if xa is not None and xb is not None and list(xa) != list(xb):
            why.append(f"different {ids.replace('_', ' ')}")
    return "; ".join(why) or None


def _norm(x: Any) -> Any:
    """Config values as JSON gives them back (tuples as lists)."""
    if isinstance(x, (tuple, list)):
        return [_norm(y) for y in x]
    return x


# --------------------------------------------------------------------------- rows


def _hw(side: dict[str, Any], task: str, seed: int, metric: str, variant: str) -> float:
    """A value's half-width: its CI's, else its side's spread over seeds, else NaN."""
    _, hw, _ = side["values"][(task, seed, metric, variant)]
    if math.isfinite(hw):
        return hw
    return side["spread"].get((task, metric, variant), math.nan)


def _tolerance(hw_a: float, hw_b: float) -> float:
    if not math.isfinite(hw_a):
        hw_a = hw_b
    if not math.isfinite(hw_b):
        hw_b = hw_a
    return hw_a + hw_b if math.isfinite(hw_a) else 0.0


def _within(diff: float, tol: float, x: float, y: float) -> bool:
    return abs(diff) <= tol + _RTOL * max(1.0, abs(x), abs(y))


def _blank_row(task, seed, metric, variant) -> dict[str, Any]:
    """One comparison row before anything is known (nothing compared yet)."""
    return dict(task=task, seed=seed, metric=metric, variant=variant,
                name=_HEADLINE[(metric, variant)], run=math.nan, reference=math.nan,
                diff=math.nan, tolerance=math.nan, within=pd.NA, note="")  # fmt: skip


def _seed_row(a, b, task, seed, metric, variant, provenance_notes, lr_notes) -> dict[str, Any]:
    key = (task, seed, metric, variant)
    row = _blank_row(task, seed, metric, variant)
    in_a, in_b = key in a["values"], key in b["values"]
    if not (in_a and in_b):
        missing = [s for s, has in (("run", in_a), ("reference", in_b)) if not has]
        row["note"] = "missing in " + " and ".join(missing)
        if len(missing) == 1:
            row["note"] += _why_missing(a if in_b else b, task, metric, [seed])
        if in_a:
            row["run"] = a["values"][key][0]
        if in_b:
            row["reference"] = b["values"][key][0]
        return row
    (x, _, note_a), (y, _, note_b) = a["values"][key], b["values"][key]
    row.update(run=x, reference=y, diff=x - y)
    notes = []
    if (task, seed) in provenance_notes:
        row["note"] = "not comparable: " + provenance_notes[(task, seed)]
        return row
    if not (math.isfinite(x) and math.isfinite(y)):
        both = not math.isfinite(x) and not math.isfinite(y)
        row["within"] = both
        if both:
            notes.append(f"undefined on both sides: {note_a or note_b or 'no reason recorded'}")
        else:
            side, why = ("run", note_a) if not math.isfinite(x) else ("reference", note_b)
            notes.append(f"undefined in {side}: {why or 'no reason recorded'}")
    else:
        ha, hb = _hw(a, *key), _hw(b, *key)
        tol = _tolerance(ha, hb)
        row.update(tolerance=tol, within=_within(x - y, tol, x, y))
        if not (math.isfinite(a["values"][key][1]) and math.isfinite(b["values"][key][1])):
            notes.append(
                "no CI: tolerance from the seeds' spread"
                if math.isfinite(ha) or math.isfinite(hb)
                else "no CI or seed spread: must match exactly"
            )
    if (task, seed) in lr_notes and variant.startswith("ft"):  # the values FT's lr moves
        notes.append(lr_notes[(task, seed)])
    row["note"] = "; ".join(notes)
    return row


def _mean_row(a, b, task, metric, variant, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    row = _blank_row(task, "mean", metric, variant)

    def own(side):
        return {
            s: (x, _hw(side, t, s, m, v))
            for (t, s, m, v), (x, _, _) in side["values"].items()
            if (t, m, v) == (task, metric, variant)
        }

    va, vb = own(a), own(b)
    common = [
        r["seed"]
        for r in per_seed
        if not pd.isna(r["within"]) and math.isfinite(r["run"]) and math.isfinite(r["reference"])
    ]
    if common:
        k = len(common)
        x = float(np.mean([va[s][0] for s in common]))
        y = float(np.mean([vb[s][0] for s in common]))
        ha = math.sqrt(sum(va[s][1] ** 2 for s in common)) / k
        hb = math.sqrt(sum(vb[s][1] ** 2 for s in common)) / k
        tol = _tolerance(ha, hb)
        row.update(run=x, reference=y, diff=x - y, tolerance=tol, within=_within(x - y, tol, x, y))
        notes = [r["note"] for r in per_seed if r["seed"] in common]
        notes = sorted({n.split(";")[0] for n in notes if n.startswith("no CI")})
        if set(common) != set(va) or set(common) != set(vb):
            notes.insert(0, f"mean over the seeds compared ({_seeds(common)})")
        row["note"] = "; ".join(notes)
        return row
    blocked = [r["note"] for r in per_seed if r["note"].startswith("not comparable")]
    fa = {s: xh for s, xh in va.items() if math.isfinite(xh[0])}
    fb = {s: xh for s, xh in vb.items() if math.isfinite(xh[0])}
    if fa:
        row["run"] = float(np.mean([x for x, _ in fa.values()]))
    if fb:
        row["reference"] = float(np.mean([x for x, _ in fb.values()]))
    row["diff"] = row["run"] - row["reference"]
    if blocked:
        row["note"] = blocked[0]
    elif not va or not vb:
        row["note"] = "missing in " + ("run" if not va else "reference")
        row["note"] += _why_missing(a if not va else b, task, metric, [r["seed"] for r in per_seed])
    elif not fa and not fb:
        row["within"] = True
        row["note"] = "undefined on both sides"
    elif not fa or not fb:
        row["within"] = False
        row["note"] = "undefined in " + ("run" if not fa else "reference")
    elif set(va) & set(vb):  # shared seeds, all undefined on one side: seed rows say why
        row["within"] = False
        row["note"] = "undefined in one side's shared seeds"
    else:  # disjoint seeds: each side's mean over its own demonstrations
        tol = _tolerance(_mean_hw(fa), _mean_hw(fb))
        x, y = row["run"], row["reference"]
        row.update(tolerance=tol, within=_within(x - y, tol, x, y))
        row["note"] = f"different seeds: run {_seeds(fa)} vs reference {_seeds(fb)}"
    return row


def _why_missing(side: dict[str, Any], task: str, metric: str, seeds: list) -> str:
    """Why ``side`` lacks ``metric`` where it has runs of ``task`` at ``seeds``: those runs
    were made before the other recording sites were recorded (no ``provenance["sites"]``)."""
    prov = [side["prov"][(task, s)] for s in seeds if (task, s) in side["prov"]]
    if metric in _OTHER_SITE_METRICS and prov and not any("sites" in p for p in prov):
        return _BEFORE_SITES
    return ""


def _mean_hw(values: dict[int, tuple[float, float]]) -> float:
    """Half-width of a mean over seeds whose demonstrations differ: the seeds' standard error
    (one seed: its own half-width)."""
    xs = [x for x, _ in values.values()]
    if len(xs) >= 2:
        return float(np.std(xs, ddof=1) / math.sqrt(len(xs)))
    return next(iter(values.values()))[1]


def _seeds(seeds: Iterable[int]) -> str:
    return ", ".join(str(s) for s in sorted(seeds))


# --------------------------------------------------------------------------- report


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    text = f"{x:.4g}"
    return text.lstrip("-") if float(text) == 0 else text


def _what(row: pd.Series) -> str:
    seed = "mean over seeds" if row["seed"] == "mean" else f"seed {row['seed']}"
    return f"{row['task']} {seed} {row['name']}"


def counts(frame: pd.DataFrame) -> dict[str, int]:
    """How many values were compared, reproduce, do not, and were not compared."""
    within = frame["within"]
    return {
        "compared": int(within.notna().sum()),
        "reproduce": int((within == True).sum()),  # noqa: E712 - nullable boolean
        "differ": int((within == False).sum()),  # noqa: E712
        "not_compared": int(within.isna().sum()),
    }


def reproduces(frame: pd.DataFrame) -> bool:
    """True when something was compared and every compared value is within its tolerance."""
    c = counts(frame)
    return c["compared"] > 0 and c["differ"] == 0


def summary_line(frame: pd.DataFrame, limit: int = 6) -> str:
    """``"N of M headline values reproduce within their CIs; K do not: ..."``, and how many
    were not compared, and why."""
    c = counts(frame)
    if c["compared"] == 0:
        line = "NOTHING was compared: no headline value is on both sides with the same provenance"
    else:
        line = (
            f"{c['reproduce']} of {c['compared']} headline values (per seed and means over "
            "seeds) reproduce within their CIs"
        )
        bad = frame[frame["within"] == False]  # noqa: E712
        if len(bad):
            shown = [
                f"{_what(r)} ({_fmt(r['run'])} vs {_fmt(r['reference'])})"
                for _, r in bad.head(limit).iterrows()
            ]
            more = f", and {len(bad) - limit} more" if len(bad) > limit else ""
            line += f"; {len(bad)} do not: " + ", ".join(shown) + more
        else:
            line += "; none differ"
    if c["not_compared"]:
        reasons = frame.loc[frame["within"].isna(), "note"].str.split(":").str[0]
        tally = reasons.value_counts()
        line += (
            f"; {c['not_compared']} not compared ("
            + ", ".join(f"{n} {why}" for why, n in tally.items())
            + ")"
        )
    return line


def report(frame: pd.DataFrame, *, per_seed: bool = False) -> str:
    """A readable comparison: both sides' versions and provenance, one table row per task and
    headline value (the mean over seeds, with how many seeds are within; every seed with
    ``per_seed``), the values that do not reproduce, loudly, and the summary line."""
    info = frame.attrs.get("compare", {})
    out = []
    run, ref = info.get("run", {}), info.get("reference", {})
    if run or ref:
        out.append(f"run:       {run.get('label', '?')}")
        out.append(f"reference: {ref.get('label', '?')}")
        head = ["", "run", "reference"]
        vrows = [["model", ", ".join(run.get("models", [])), ", ".join(ref.get("models", []))]]
        for k in VERSION_KEYS:
            va = ", ".join(run.get("versions", {}).get(k, [])) or "–"
            vb = ", ".join(ref.get("versions", {}).get(k, [])) or "–"
            vrows.append([k, va, vb])
        out.append(_text_table(head, vrows))
        prov = info.get("provenance", {})
        if prov:
            out.append(
                f"NOT COMPARABLE ({len(prov)} task/seed runs differ in provenance; their numbers "
                "are not compared):"
            )
            out += [f"  {k}: {why}" for k, why in prov.items()]
        out.append("")

    head = ["task", "seed", "value", "run", "reference", "diff", "tolerance", "within", "note"]
    rows = []
    gone = {}  # tasks with no value on one side: one line each
    for task, group in frame.groupby("task", sort=False):
        notes = set(group["note"])
        if len(notes) == 1 and next(iter(notes)).startswith("missing in"):
            gone[task] = next(iter(notes))
    for _, r in frame.iterrows():
        if r["task"] in gone:
            if gone[r["task"]]:
                rows.append([r["task"], "all", "all values", *"––––", "–", gone[r["task"]]])
                gone[r["task"]] = ""
            continue
        if r["seed"] != "mean" and not per_seed:
            continue
        verdict = "–" if pd.isna(r["within"]) else ("yes" if r["within"] else "NO")
        seed = str(r["seed"])
        if r["seed"] == "mean":
            seeds = frame[(frame.task == r["task"]) & (frame.metric == r["metric"])]
            seeds = seeds[(seeds.variant == r["variant"]) & (seeds.seed != "mean")]
            if seeds["within"].notna().any():
                seed = f"mean ({int((seeds['within'] == True).sum())}/"  # noqa: E712
                seed += f"{int(seeds['within'].notna().sum())} within)"
        cells = [r["run"], r["reference"], r["diff"], r["tolerance"]]
        note = r["note"] or ""
        if note.startswith("not comparable"):
            note = "not comparable (provenance above)"
        rows.append([r["task"], seed, r["name"], *map(_fmt, cells), verdict, note])
    out.append(_text_table(head, rows))
    bad = frame[frame["within"] == False]  # noqa: E712
    if len(bad):
        out.append("")
        out.append(f"DOES NOT REPRODUCE ({len(bad)} values outside their tolerance):")
        for _, r in bad.iterrows():
            extra = f"; {r['note']}" if r["note"] else ""
            out.append(
                f"  !! {_what(r)}: run {_fmt(r['run'])} vs reference {_fmt(r['reference'])}, "
                f"diff {_fmt(r['diff'])}, tolerance {_fmt(r['tolerance'])}{extra}"
            )
    out.append("")
    out.append(summary_line(frame))
    return "\n".join(out)


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)
