"""Tests for icl_lens.metrics: each metric against an independent naive loop implementation,
Hypothesis properties (ranges, invariances), edge cases and the shared-origin null."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icl_lens import metrics as M

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
seeds = st.integers(0, 2**31 - 1)


# --------------------------------------------------------------------------- naive references
# Written with explicit loops over plain Python / numpy values; they share no code with metrics.


def n_dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def n_norm(a):
    return math.sqrt(n_dot(a, a))


def n_cos(a, b):
    return n_dot(a, b) / (n_norm(a) * n_norm(b))


def n_unit(a):
    n = n_norm(a)
    return [float(x) / n for x in a]


def n_sub(a, b):
    return [float(x) - float(y) for x, y in zip(a, b, strict=True)]


def n_simaou(zs, icl, ft):
    E, L, _ = zs.shape
    out = np.zeros((E, L))
    for e in range(E):
        for layer in range(L):
            z, i, f = n_unit(zs[e, layer]), n_unit(icl[e, layer]), n_unit(ft[e, layer])
            out[e, layer] = n_cos(n_sub(i, z), n_sub(f, z))
    return out


def n_simaou_orth(zs, icl, ft):
    E, L, _ = zs.shape
    out = np.zeros((E, L))
    for e in range(E):
        for layer in range(L):
            z, i, f = n_unit(zs[e, layer]), n_unit(icl[e, layer]), n_unit(ft[e, layer])
            pi = [x - n_dot(i, z) * zz for x, zz in zip(i, z, strict=True)]
            pf = [x - n_dot(f, z) * zz for x, zz in zip(f, z, strict=True)]
            out[e, layer] = n_cos(pi, pf)
    return out


def n_null(zs, icl, ft):
    E, L, _ = zs.shape
    out = np.zeros((E, L))
    for e in range(E):
        for layer in range(L):
            ci = n_cos(icl[e, layer], zs[e, layer])
            cf = n_cos(ft[e, layer], zs[e, layer])
            out[e, layer] = math.sqrt((1 - ci) * (1 - cf)) / 2
    return out


def n_visible(row, vis, centered):
    vals = [float(x) for x, v in zip(row, vis, strict=True) if v]
    if centered:
        m = sum(vals) / len(vals)
        vals = [x - m for x in vals]
    return vals


def n_simam(a, b, vis, centered=False):
    E, L, H, _ = a.shape
    out = np.zeros((E, L))
    for e in range(E):
        for layer in range(L):
            total = 0.0
            for h in range(H):
                va = n_visible(a[e, layer, h], vis[e, layer, h], centered)
                vb = n_visible(b[e, layer, h], vis[e, layer, h], centered)
                total += n_cos(va, vb)
            out[e, layer] = total / H
    return out


def n_simam_delta(zs, icl, ft, vis, centered=False):
    E, L, H, _ = zs.shape
    out = np.zeros((E, L))
    for e in range(E):
        for layer in range(L):
            total = 0.0
            for h in range(H):
                v = vis[e, layer, h]
                z = n_visible(zs[e, layer, h], v, centered)
                i = n_visible(icl[e, layer, h], v, centered)
                f = n_visible(ft[e, layer, h], v, centered)
                total += n_cos(n_sub(i, z), n_sub(f, z))
            out[e, layer] = total / H
    return out


def n_tau_b(x, y):
    n = len(x)
    conc = disc = tie_x = tie_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            if dx == 0:
                tie_x += 1
            if dy == 0:
                tie_y += 1
            if dx != 0 and dy != 0:
                if dx == dy:
                    conc += 1
                else:
                    disc += 1
    n0 = n * (n - 1) // 2
    denom = math.sqrt((n0 - tie_x) * (n0 - tie_y))
    return (conc - disc) / denom if denom else math.nan  # a constant ranking: 0/0


def n_softmax(xs):
    m = max(xs)
    ex = [math.exp(x - m) for x in xs]
    s = sum(ex)
    return [v / s for v in ex]


def n_kendall(icl_scores, q_test, train_q, demo_of_token, vis):
    E, L, H, T = icl_scores.shape
    tok = np.full((E, L), np.nan)
    exm = np.full((E, L), np.nan)
    for e in range(E):
        for layer in range(L):
            idx = [t for t in range(T) if vis[e, layer, t]]
            icl_logit = [sum(float(icl_scores[e, layer, h, t]) for h in range(H)) for t in idx]
            ft_logit = [n_dot(q_test[e, layer], train_q[layer, t]) for t in idx]
            wi, wf = n_softmax(icl_logit), n_softmax(ft_logit)
            if len(idx) >= 2:
                tok[e, layer] = n_tau_b(wi, wf)
            si, sf = {}, {}
            for k, t in enumerate(idx):
                d = int(demo_of_token[t])
                si[d] = si.get(d, 0.0) + wi[k]
                sf[d] = sf.get(d, 0.0) + wf[k]
            demos = sorted(si)
            if len(demos) >= 2:
                exm[e, layer] = n_tau_b([si[d] for d in demos], [sf[d] for d in demos])
    return tok, exm


def n_rec2ftp(zs, icl, ft, y, n_labels):
    rates = [0.0] * n_labels
    for p in icl:
        rates[p] += 1 / len(icl)
    den = num = 0
    chance = 0.0
    for a, b, c, t in zip(zs, icl, ft, y, strict=True):
        if a != t and c == t:
            den += 1
            chance += rates[t]
            if b == t:
                num += 1
    return 100 * num / den, den, num, 100 * chance / den, rates


def n_change_agreement(zs, icl, ft):
    ci = cf = same = 0
    for a, b, c in zip(zs, icl, ft, strict=True):
        ci += b != a
        cf += c != a
        same += (b != a) and (c != a) and (b == c)
    return same / (ci + cf - same), ci, cf, same


def n_bootstrap(x, n_boot, alpha, seed):
    rng = np.random.default_rng(seed)
    thetas = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), size=len(x))
        thetas.append(sum(x[i] for i in idx) / len(x))
    return np.quantile(np.array(thetas), alpha / 2), np.quantile(np.array(thetas), 1 - alpha / 2)


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def vis_mask(E, L, H, T, seed, p=0.75):
    """Random visibility with at least 2 visible keys per row."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(E, L, H, T, generator=g) < p
    m[..., :2] = True
    return m


# --------------------------------------------------------------------------- classification


def test_accuracy_and_label_distribution_against_naive():
    g = torch.Generator().manual_seed(1)
    p, y = torch.randint(0, 4, (57,), generator=g), torch.randint(0, 4, (57,), generator=g)
    assert M.accuracy(p, y) == pytest.approx(
        sum(int(a == b) for a, b in zip(p, y, strict=True)) / 57
    )
    dist = M.label_distribution(p, 5)
    naive = [sum(int(v) == c for v in p) / 57 for c in range(5)]
    np.testing.assert_allclose(dist.numpy(), naive)
    assert dist[4] == 0
    with pytest.raises(M.UndefinedMetricError):
        M.accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        M.label_distribution(torch.tensor([0, 3]), 3)


@SETTINGS
@given(seed=seeds, n=st.integers(1, 60), n_labels=st.integers(2, 5))
def test_rec2ftp_and_change_agreement_against_naive(seed, n, n_labels):
    rng = np.random.default_rng(seed)
    zs, icl, ft, y = (rng.integers(0, n_labels, n) for _ in range(4))
    t = [torch.as_tensor(v) for v in (zs, icl, ft, y)]
    den = sum((a != c) and (b == c) for a, b, c in zip(zs, ft, y, strict=True))
    if den == 0:
        with pytest.raises(M.UndefinedMetricError):
            M.rec2ftp(*t, n_labels=n_labels)
    else:
        r = M.rec2ftp(*t, n_labels=n_labels)
        value, nd, nn, chance, rates = n_rec2ftp(zs, icl, ft, y, n_labels)
        assert (r.value, r.n_zs_wrong_ft_right, r.n_also_icl_right) == (
            pytest.approx(value),
            nd,
            nn,
        )
        assert r.chance == pytest.approx(chance)
        np.testing.assert_allclose(r.icl_label_rates.numpy(), rates)
    changed = sum(a != b for a, b in zip(zs, icl, strict=True)) + sum(
        a != c for a, c in zip(zs, ft, strict=True)
    )
    if changed == 0:
        with pytest.raises(M.UndefinedMetricError):
            M.change_agreement(*t[:3])
    else:
        c = M.change_agreement(*t[:3])
        value, ci, cf, same = n_change_agreement(zs, icl, ft)
        assert c.value == pytest.approx(value)
        assert (c.n_icl_changed, c.n_ft_changed, c.n_same) == (ci, cf, same)
        assert c.n_denominator == ci + cf - same


def test_rec2ftp_edge_cases():
    y = torch.tensor([1, 1, 0, 0, 1])
    zs = torch.tensor([0, 0, 1, 1, 1])  # wrong on the first four
    ft = torch.tensor([1, 1, 0, 0, 1])  # right everywhere
    # all ICL right -> 100
    r = M.rec2ftp(zs, y, ft, y)
    assert r.value == 100.0 and r.n_zs_wrong_ft_right == 4 and r.n_also_icl_right == 4
    # hand example for chance: ICL predicts [1,1,1,0,1]: rates p(0)=0.2, p(1)=0.8;
    # D = first four, labels 1,1,0,0 -> chance = 100*(0.8+0.8+0.2+0.2)/4 = 50; value = 3/4.
    r = M.rec2ftp(zs, torch.tensor([1, 1, 1, 0, 1]), ft, y)
    assert r.value == pytest.approx(75.0)
    assert r.chance == pytest.approx(50.0)
    np.testing.assert_allclose(r.icl_label_rates.numpy(), [0.2, 0.8])
    # label collapse: ICL always predicts 1 -> chance = 100 * p(1) * (#label-1 in D) / |D|
    r = M.rec2ftp(zs, torch.ones(5, dtype=torch.long), ft, y)
    assert r.value == pytest.approx(50.0) and r.chance == pytest.approx(50.0)
    # denominator 0: ZS already right wherever FT is right
    with pytest.raises(M.UndefinedMetricError, match="ZS is wrong and FT is right"):
        M.rec2ftp(y, y, y, y)
    with pytest.warns(M.UndefinedMetricWarning):
        r = M.rec2ftp(y, y, y, y, on_undefined="nan")
    assert math.isnan(r.value) and r.n_zs_wrong_ft_right == 0


def test_f2t_mask():
    y = torch.tensor([1, 1, 0, 0, 1])
    zs = torch.tensor([0, 0, 1, 0, 1])
    ft = torch.tensor([1, 0, 0, 0, 1])
    icl = torch.tensor([1, 1, 1, 0, 1])
    assert M.f2t_mask(zs, icl, ft, y).tolist() == [True, False, False, False, False]


def test_change_agreement_hand_example():
    zs = torch.tensor([0, 0, 1, 1, 2])
    icl = torch.tensor([1, 1, 1, 0, 2])  # changed: 0, 1, 3
    ft = torch.tensor([1, 2, 0, 0, 2])  # changed: 0, 1, 2, 3; same label as ICL at 0 and 3
    c = M.change_agreement(zs, icl, ft)
    assert (c.n_icl_changed, c.n_ft_changed, c.n_same, c.n_denominator) == (3, 4, 2, 5)
    assert c.value == pytest.approx(2 / 5)
    with pytest.raises(M.UndefinedMetricError):
        M.change_agreement(zs, zs, zs)


# --------------------------------------------------------------------------- SimAOU


def test_simaou_family_against_naive():
    zs, icl, ft = rand(4, 3, 16, seed=1), rand(4, 3, 16, seed=2), rand(4, 3, 16, seed=3)
    icl = icl + 0.7 * zs  # make the null non-trivial
    args = [x.numpy() for x in (zs, icl, ft)]
    np.testing.assert_allclose(M.simaou(zs, icl, ft).numpy(), n_simaou(*args), atol=1e-10)
    np.testing.assert_allclose(
        M.simaou_orthogonal(zs, icl, ft).numpy(), n_simaou_orth(*args), atol=1e-10
    )
    np.testing.assert_allclose(M.shared_origin_null(zs, icl, ft).numpy(), n_null(*args), atol=1e-10)
    u = M.uniform_random_like(zs, torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() < 1 and u.shape == zs.shape
    naive = np.zeros((4, 3))
    for e in range(4):
        for layer in range(3):
            d = n_sub(n_unit(args[1][e, layer]), n_unit(args[0][e, layer]))
            naive[e, layer] = n_cos(d, u[e, layer].numpy())
    np.testing.assert_allclose(M.simaou_random(zs, icl, u).numpy(), naive, atol=1e-10)
    gsn = M.gaussian_random_like(zs, torch.Generator().manual_seed(0))
    assert gsn.shape == zs.shape and (gsn < 0).any()


vec_shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(2, 24))


@SETTINGS
@given(seed=seeds, shape=vec_shapes, log_scales=st.lists(st.floats(-6, 6), min_size=3, max_size=3))
def test_simaou_properties(seed, shape, log_scales):
    zs, icl, ft = (rand(*shape, seed=seed + k).double() for k in range(3))
    base = M.simaou(zs, icl, ft)
    orth = M.simaou_orthogonal(zs, icl, ft)
    null = M.shared_origin_null(zs, icl, ft)
    for v in (base, orth):
        assert ((v >= -1) & (v <= 1)).all()
    assert ((null >= 0) & (null <= 1)).all()
    # each vector may be scaled by its own positive constant: L2-normalisation removes it
    g = torch.Generator().manual_seed(seed)
    sc = [
        torch.exp(s + torch.rand(*shape[:2], 1, generator=g, dtype=torch.float64))
        for s in log_scales
    ]
    z2, i2, f2 = zs * sc[0], icl * sc[1], ft * sc[2]
    torch.testing.assert_close(M.simaou(z2, i2, f2), base, atol=1e-9, rtol=0)
    torch.testing.assert_close(M.simaou_orthogonal(z2, i2, f2), orth, atol=1e-9, rtol=0)
    torch.testing.assert_close(M.shared_origin_null(z2, i2, f2), null, atol=1e-9, rtol=0)


@SETTINGS
@given(
    zs=st.lists(st.floats(-1e3, 1e3, width=32), min_size=4, max_size=4),
    icl=st.lists(st.floats(-1e3, 1e3, width=32), min_size=4, max_size=4),
    ft=st.lists(st.floats(-1e3, 1e3, width=32), min_size=4, max_size=4),
)
def test_simaou_range_or_undefined_on_adversarial_values(zs, icl, ft):
    t = [torch.tensor(v).view(1, 1, 4) for v in (zs, icl, ft)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.UndefinedMetricWarning)
        for fn in (M.simaou, M.simaou_orthogonal):
            v = fn(*t, on_undefined="nan")
            assert torch.isnan(v).all() or ((v >= -1) & (v <= 1)).all()


def test_simaou_undefined_handling():
    zs, icl, ft = rand(3, 2, 8, seed=1), rand(3, 2, 8, seed=2), rand(3, 2, 8, seed=3)
    icl[1, 0] = 2.5 * zs[1, 0]  # same direction -> zero update
    ft[2, 1] = 0.0  # zero vector
    with pytest.raises(M.UndefinedMetricError, match="simaou undefined at 2 of 6"):
        M.simaou(zs, icl, ft)
    with pytest.warns(M.UndefinedMetricWarning, match="at 2 of 6"):
        v = M.simaou(zs, icl, ft, on_undefined="nan")
    assert torch.isnan(v).sum() == 2 and torch.isnan(v[1, 0]) and torch.isnan(v[2, 1])
    with pytest.raises(ValueError, match="non-finite"):
        M.simaou(zs, icl, ft.index_fill(0, torch.tensor([0]), math.inf))
    with pytest.raises(ValueError, match="on_undefined"):
        M.simaou(zs, icl, zs + 1, on_undefined="skip")


def random_unit_with_cos(z, c, gen):
    """Unit vectors with cos(., z) = c whose parts orthogonal to z are uniformly random."""
    r = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    r = r - (r * z).sum(-1, keepdim=True) * z
    return c * z + math.sqrt(1 - c * c) * r / r.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("c_icl,c_ft", [(0.0, 0.0), (0.5, 0.2), (0.9, 0.7), (-0.4, 0.3)])
def test_shared_origin_null_monte_carlo(c_icl, c_ft):
    """E[cos(a - z, b - z)] = sqrt((1 - c_a)(1 - c_b)) / 2 for unrelated orthogonal parts."""
    gen = torch.Generator().manual_seed(7)
    d, n = 2048, 200
    z = torch.randn(n, 1, d, generator=gen, dtype=torch.float64)
    z = z / z.norm(dim=-1, keepdim=True)
    # arbitrary norms: only directions matter
    zs = 3.0 * z
    icl = 0.5 * random_unit_with_cos(z, c_icl, gen)
    ft = 7.0 * random_unit_with_cos(z, c_ft, gen)
    # direct Monte Carlo estimate, computed here without the module
    mc = n_simaou(zs[:5].numpy(), icl[:5].numpy(), ft[:5].numpy()).mean()
    mc_all = M.simaou(zs, icl, ft).mean().item()
    expected = math.sqrt((1 - c_icl) * (1 - c_ft)) / 2
    null = M.shared_origin_null(zs, icl, ft)
    torch.testing.assert_close(null, torch.full_like(null, expected), atol=1e-9, rtol=0)
    assert mc_all == pytest.approx(expected, abs=0.01)
    assert mc == pytest.approx(expected, abs=0.02)
    assert M.simaou_orthogonal(zs, icl, ft).mean().item() == pytest.approx(0.0, abs=0.02)


def test_shared_origin_null_is_beaten_by_related_updates():
    gen = torch.Generator().manual_seed(3)
    d = 512
    z = torch.randn(d, generator=gen, dtype=torch.float64)
    z = z / z.norm()
    shared = random_unit_with_cos(z, 0.0, gen)  # common orthogonal direction
    icl = (0.6 * z + 0.8 * shared).view(1, 1, d)
    ft = (0.3 * z + math.sqrt(1 - 0.09) * shared).view(1, 1, d)
    zs = z.view(1, 1, d)
    assert M.simaou(zs, icl, ft).item() > M.shared_origin_null(zs, icl, ft).item() + 0.2
    assert M.simaou_orthogonal(zs, icl, ft).item() == pytest.approx(1.0)


# --------------------------------------------------------------------------- SimAM


def test_simam_against_naive_with_mask():
    E, L, H, T = 3, 2, 4, 9
    a, b, c = rand(E, L, H, T, seed=1), rand(E, L, H, T, seed=2), rand(E, L, H, T, seed=3)
    vis = vis_mask(E, L, H, T, seed=4)
    a_inf = a.masked_fill(~vis, -math.inf)  # hidden entries may hold -inf
    npv = [x.numpy() for x in (a, b, c)]
    for centered in (False, True):
        np.testing.assert_allclose(
            M.simam(a_inf, b, vis, centered=centered).numpy(),
            n_simam(npv[0], npv[1], vis.numpy(), centered),
            atol=1e-10,
        )
        np.testing.assert_allclose(
            M.simam_delta(a_inf, b, c, vis, centered=centered).numpy(),
            n_simam_delta(npv[0], npv[1], npv[2], vis.numpy(), centered),
            atol=1e-10,
        )
    # a [example, layer, key] mask applies to every head
    m3 = vis[:, :, 0, :]
    full = m3.unsqueeze(2).expand(E, L, H, T)
    np.testing.assert_allclose(
        M.simam(a, b, m3).numpy(), n_simam(npv[0], npv[1], full.numpy()), atol=1e-10
    )
    per_head = M.simam(a, b, vis, reduce_heads=False)
    assert per_head.shape == (E, L, H)
    torch.testing.assert_close(per_head.mean(-1), M.simam(a, b, vis))


def test_simam_mask_handling():
    a, b = rand(2, 2, 3, 6, seed=1), rand(2, 2, 3, 6, seed=2)
    vis = torch.ones(2, 2, 3, 6, dtype=torch.bool)
    vis[0, 1, 2, 4] = False
    a_bad = a.clone()
    a_bad[0, 1, 2, 4] = -math.inf
    ref = M.simam(a, b, vis)
    torch.testing.assert_close(M.simam(a_bad, b, vis), ref)  # -inf hidden: ignored
    a_bad[1, 0, 0, 0] = -math.inf  # -inf visible: error
    with pytest.raises(ValueError, match="visible positions"):
        M.simam(a_bad, b, vis)
    a_nan = a.clone()
    a_nan[0, 0, 0, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        M.simam(a_nan, b)
    with pytest.raises(ValueError, match="non-finite"):
        M.simam_delta(a, b, a_nan, vis)
    # a row with no visible key is undefined, never averaged
    vis[1, 1, 0] = False
    with pytest.raises(M.UndefinedMetricError, match="no visible keys"):
        M.simam(a, b, vis)
    with pytest.warns(M.UndefinedMetricWarning):
        v = M.simam(a, b, vis, on_undefined="nan")
    assert torch.isnan(v[1, 1]) and torch.isnan(v).sum() == 1
    with pytest.raises(ValueError, match="does not fit"):
        M.simam(a, b, vis[0, 0])  # a 2-D mask is ambiguous
    with pytest.raises(ValueError, match="bool"):
        M.simam(a, b, vis.float())


def test_simam_undefined_rows():
    a, b = rand(1, 2, 2, 5, seed=1), rand(1, 2, 2, 5, seed=2)
    b[0, 0, 1] = 4.0  # constant row: fine raw, zero once centred
    M.simam(a, b)
    with pytest.raises(M.UndefinedMetricError, match="zero centred row b"):
        M.simam(a, b, centered=True)
    # identical ICL and ZS rows -> zero ICL update -> SimAM_delta undefined
    with pytest.raises(M.UndefinedMetricError, match="zero-norm ICL update"):
        M.simam_delta(a, a.clone(), b)
    # float32 rounding-level update: undefined by default (tolerance = 4 eps of the dtype)
    with pytest.raises(M.UndefinedMetricError, match="zero-norm ICL update"):
        M.simam_delta(a, a * (1 + 1e-8 * rand(1, 2, 2, 5, seed=5)), b)
    # the same relative change in float64 is above float64's rounding level
    a64 = a.double()
    M.simam_delta(a64, a64 * (1 + 1e-8 * rand(1, 2, 2, 5, seed=5).double()), b.double())
    # a small real update is defined by default and undefined under a looser tolerance
    icl = a + 1e-3 * rand(1, 2, 2, 5, seed=5)
    M.simam_delta(a, icl, b)
    with pytest.raises(M.UndefinedMetricError):
        M.simam_delta(a, icl, b, zero_tol=1e-2)


score_shapes = st.tuples(
    st.integers(1, 2), st.integers(1, 2), st.integers(1, 3), st.integers(2, 12)
)


@SETTINGS
@given(seed=seeds, shape=score_shapes, log_scale=st.floats(-5, 5), shift=st.floats(-50, 50))
def test_simam_properties(seed, shape, log_scale, shift):
    a, b, c = (rand(*shape, seed=seed + k).double() for k in range(3))
    vis = vis_mask(*shape, seed=seed + 3)
    g = torch.Generator().manual_seed(seed)
    for fn in (
        lambda: M.simam(a, b, vis),
        lambda: M.simam(a, b, vis, centered=True),
        lambda: M.simam_delta(a, b, c, vis),
        lambda: M.simam_delta(a, b, c, vis, centered=True),
    ):
        v = fn()
        assert ((v >= -1) & (v <= 1)).all()
    # positive scaling of individual rows
    row_scale = math.exp(log_scale) * (0.5 + torch.rand(*shape[:3], 1, generator=g).double())
    torch.testing.assert_close(M.simam(a * row_scale, b, vis), M.simam(a, b, vis))
    torch.testing.assert_close(M.simam(a, b / row_scale, vis), M.simam(a, b, vis))
    # centred: a constant per row (different per row) changes nothing
    row_shift = shift * torch.rand(*shape[:3], 1, generator=g).double()
    ref = M.simam(a, b, vis, centered=True)
    torch.testing.assert_close(M.simam(a + row_shift, b - row_shift, vis, centered=True), ref)
    torch.testing.assert_close(
        M.simam_delta(a + row_shift, b, c - row_shift, vis, centered=True),
        M.simam_delta(a, b, c, vis, centered=True),
    )
    # scaling all three rows of SimAM_delta together leaves it unchanged
    torch.testing.assert_close(
        M.simam_delta(a * row_scale, b * row_scale, c * row_scale, vis),
        M.simam_delta(a, b, c, vis),
    )


# --------------------------------------------------------------------------- Kendall


def test_kendall_against_naive_with_mask():
    E, L, H, T, D = 3, 2, 4, 12, 8
    icl, q = rand(E, L, H, T, seed=1), rand(E, L, D, seed=2)
    train_q = rand(L, T, D, seed=3)
    demo = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])
    g = torch.Generator().manual_seed(5)
    vis = torch.rand(E, L, T, generator=g) < 0.8
    vis[0, 1, :] = False
    vis[0, 1, 10:] = True  # only demo 4 visible -> example level undefined
    icl_masked = icl.masked_fill(~vis.unsqueeze(2), -math.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.UndefinedMetricWarning)
        r = M.kendall_icl_ft(icl_masked, q, train_q, demo, vis, on_undefined="nan")
    tok, exm = n_kendall(icl.numpy(), q.numpy(), train_q.numpy(), demo.numpy(), vis.numpy())
    np.testing.assert_allclose(r.token.numpy(), tok, atol=1e-10)
    np.testing.assert_allclose(r.example.numpy(), exm, atol=1e-10)
    assert torch.isnan(r.example[0, 1]) and not torch.isnan(r.token[0, 1])
    assert torch.equal(r.n_visible_tokens, vis.sum(-1))
    assert r.n_visible_demos[0, 1] == 1
    with pytest.raises(M.UndefinedMetricError, match="example level"):
        M.kendall_icl_ft(icl_masked, q, train_q, demo, vis)
    # token level only, no mask
    r2 = M.kendall_icl_ft(icl, q, train_q)
    full = torch.ones(E, L, T, dtype=torch.bool).numpy()
    tok2, _ = n_kendall(icl.numpy(), q.numpy(), train_q.numpy(), demo.numpy(), full)
    np.testing.assert_allclose(r2.token.numpy(), tok2, atol=1e-10)
    assert r2.example is None and r2.n_visible_demos is None


@SETTINGS
@given(seed=seeds, T=st.integers(2, 10), H=st.integers(1, 3))
def test_kendall_ties_match_naive_tau_b(seed, T, H):
    g = torch.Generator().manual_seed(seed)
    icl = torch.randint(-2, 3, (2, 2, H, T), generator=g).float()  # integer scores: many ties
    q = torch.randint(-1, 2, (2, 2, 3), generator=g).float()
    train_q = torch.randint(-1, 2, (2, T, 3), generator=g).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.UndefinedMetricWarning)
        r = M.kendall_icl_ft(icl, q, train_q, on_undefined="nan")
    full = np.ones((2, 2, T), dtype=bool)
    tok, _ = n_kendall(icl.numpy(), q.numpy(), train_q.numpy(), np.arange(T), full)
    np.testing.assert_allclose(r.token.numpy(), tok, atol=1e-10)  # NaN where naive is 0/0
    finite = r.token[~torch.isnan(r.token)]
    assert ((finite >= -1) & (finite <= 1)).all()


@SETTINGS
@given(seed=seeds, T=st.integers(2, 15), H=st.integers(1, 4), scale=st.floats(0.1, 5))
def test_kendall_identical_and_reversed_rankings(seed, T, H, scale):
    """ICL head-sum = order + c, FT logits = scale * order + c': same ranking (tau 1); -q: -1."""
    g = torch.Generator().manual_seed(seed)
    E, L = 2, 2
    order = torch.randperm(T, generator=g).double()  # distinct values: no ties
    shift = torch.randn(E, L, 1, generator=g, dtype=torch.float64)  # softmax ignores it
    icl = torch.randn(E, L, H, T, generator=g, dtype=torch.float64)
    icl[:, :, 0] += order + shift - icl.sum(2)  # now sum over heads = order + shift
    train_q = torch.stack([order, torch.ones(T, dtype=torch.float64)], -1).expand(L, T, 2)
    q = torch.randn(E, L, 2, generator=g, dtype=torch.float64)  # q . q_t = q0 * order_t + q1
    q[..., 0] = scale
    demo = torch.arange(T)
    r = M.kendall_icl_ft(icl, q, train_q, demo)
    torch.testing.assert_close(r.token, torch.ones(E, L, dtype=torch.float64))
    torch.testing.assert_close(r.example, torch.ones(E, L, dtype=torch.float64))
    r = M.kendall_icl_ft(icl, -q, train_q, demo)
    torch.testing.assert_close(r.token, -torch.ones(E, L, dtype=torch.float64))


def test_kendall_alignment_and_shape_errors():
    icl, q, tq = rand(2, 3, 2, 7, seed=1), rand(2, 3, 5, seed=2), rand(3, 6, 5, seed=3)
    with pytest.raises(ValueError, match="same demonstrations, in the same order"):
        M.kendall_icl_ft(icl, q, tq)
    with pytest.raises(ValueError, match="disagree"):
        M.kendall_icl_ft(icl, rand(2, 2, 5, seed=2), rand(3, 7, 5, seed=3))
    with pytest.raises(ValueError, match="demo_of_token"):
        M.kendall_icl_ft(icl, q, rand(3, 7, 5, seed=3), torch.tensor([0, 1]))
    bad = icl.clone()
    bad[0, 0, 1, 3] = -math.inf  # visible -inf
    with pytest.raises(ValueError, match="non-finite"):
        M.kendall_icl_ft(bad, q, rand(3, 7, 5, seed=3))


def test_kendall_random_baseline():
    E, L, H, T = 40, 2, 2, 20
    icl = rand(E, L, H, T, seed=1)
    demo = torch.arange(T) // 2
    r = M.kendall_random_baseline(icl, demo, generator=torch.Generator().manual_seed(0))
    assert r.token.shape == (E, L) and r.example.shape == (E, L)
    assert abs(r.token.mean().item()) < 0.06 and abs(r.example.mean().item()) < 0.08
    assert ((r.token >= -1) & (r.token <= 1)).all()
    r2 = M.kendall_random_baseline(icl, demo, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r.token, r2.token)  # reproducible from the generator
    # against naive tau-b: the baseline is tau(ICL weights, u) for the drawn u
    w = M.icl_demo_weights(icl)
    u = torch.rand(w.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert r.token[3, 1].item() == pytest.approx(n_tau_b(w[3, 1].tolist(), u[3, 1].tolist()))


def test_demo_and_ft_weights_are_softmaxes():
    icl, vis = rand(2, 2, 3, 6, seed=1), torch.rand(2, 2, 6) < 0.7
    vis[..., 0] = True
    w = M.icl_demo_weights(icl, vis)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, dtype=torch.float64))
    assert (w[~vis] == 0).all()
    f = M.ft_train_weights(rand(2, 2, 4, seed=2), rand(2, 6, 4, seed=3), vis)
    torch.testing.assert_close(f.sum(-1), torch.ones(2, 2, dtype=torch.float64))
    assert (f[~vis] == 0).all()


# --------------------------------------------------------------------------- reducers


def test_layer_means():
    x = rand(7, 4, seed=1).double()
    per_layer, overall = M.layer_means(x)
    naive = [sum(float(x[e, layer]) for e in range(7)) / 7 for layer in range(4)]
    np.testing.assert_allclose(per_layer.numpy(), naive)
    assert overall == pytest.approx(sum(naive) / 4)
    x[2, 1] = math.nan
    with pytest.raises(M.UndefinedMetricError, match="1 of 28"):
        M.layer_means(x)
    lm = M.layer_means(x, skip_nan=True)
    assert lm.n_used.tolist() == [7, 6, 7, 7]
    kept = [float(x[e, 1]) for e in range(7) if e != 2]
    assert lm.per_layer[1].item() == pytest.approx(sum(kept) / 6)
    x[:, 3] = math.nan
    with pytest.raises(M.UndefinedMetricError, match=r"layer\(s\) \[3\]"):
        M.layer_means(x, skip_nan=True)


def test_bootstrap_ci_against_naive_and_contains_mean():
    x = rand(40, seed=1).double()
    low, high = M.bootstrap_ci(x, n_boot=300, seed=3)
    nl, nh = n_bootstrap(x.tolist(), 300, 0.05, 3)
    assert low.item() == pytest.approx(nl, abs=1e-12) and high.item() == pytest.approx(nh)
    assert low <= x.mean() <= high
    # trailing dims: one interval per column, each equal to the 1-D computation
    xy = torch.stack([x, 2 * x + 1], dim=1)
    lows, highs = M.bootstrap_ci(xy, n_boot=300, seed=3)
    assert lows.shape == (2,)
    assert lows[1].item() == pytest.approx(2 * nl + 1) and highs[1].item() == pytest.approx(
        2 * nh + 1
    )
    # median as stat
    lo_med, hi_med = M.bootstrap_ci(x, n_boot=200, stat=np.median)
    assert lo_med <= x.median() <= hi_med
    with pytest.raises(M.UndefinedMetricError):
        M.bootstrap_ci(torch.tensor([1.0, math.nan]))
    with pytest.raises(M.UndefinedMetricError):
        M.bootstrap_ci(torch.tensor([]))


@SETTINGS
@given(seed=seeds, n=st.integers(1, 80))
def test_bootstrap_ci_contains_mean_property(seed, n):
    x = torch.from_numpy(np.random.default_rng(seed).exponential(size=n))
    low, high = M.bootstrap_ci(x, n_boot=200, seed=seed)
    assert low.item() - 1e-12 <= x.mean().item() <= high.item() + 1e-12


def test_bootstrap_ci_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=30), rng.normal(size=3000)
    ls, hs = M.bootstrap_ci(torch.from_numpy(small), n_boot=500)
    ll, hl = M.bootstrap_ci(torch.from_numpy(large), n_boot=500)
    assert (hl - ll) < 0.25 * (hs - ls)
