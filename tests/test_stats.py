"""The statistics engine: centred per-batch moments combined in float64 (Chan et al.) stay exact when |mean| ≫ std."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vf_lightning import stats
from vf_lightning.align import activation_statistics, build_permutation_spec, statistics
from vf_lightning.align.statistics import CrossMoments
from vf_lightning.models import ModelConfig, build_model
from vf_lightning.stats import (
    FUSED_MIN_ROWS,
    WELL_CONDITIONED,
    Moments,
    centre,
    fused_partials,
    pool_partials,
    stream_moments,
)


def _shifted(n: int, c: int = 6, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n × c`` correlated channels with ``|mean| = 1e4·std`` (std 1..3, alternating signs), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64)
    z = z @ (torch.eye(c, dtype=torch.float64) + 0.5 * torch.randn(c, c, generator=g, dtype=torch.float64))
    z = (z - z.mean(0)) / z.std(0) * torch.linspace(1, 3, c, dtype=torch.float64)
    mean = 1e4 * torch.linspace(1, 3, c, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(c // 2)
    return (z + mean).to(dtype)


def fused_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Float64 mean and ``M2`` of a batch by the fused path (its partials pooled), or ``None`` where it refuses."""
    parts = fused_partials(x)
    if parts is None:
        return None
    mean, m2 = pool_partials([parts])
    return mean[0], m2[0]


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 two-pass mean, population variance and correlation of ``n × c`` rows."""
    d = x.double()
    m = d.mean(0)
    cen = d - m
    cov = cen.t() @ cen / d.shape[0]
    s = cov.diagonal().sqrt()
    return m, cov.diagonal(), cov / torch.outer(s, s)


SIZES = (100, 37, 250, 13, 1, 64)


def _batches(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.split(list(SIZES)))


@pytest.mark.parametrize("pool_every", [64, 2, 1])
def test_large_mean_float32_batches_match_the_two_pass_reference(pool_every: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches added to Moments are pooled when read or every ``POOL_BATCHES``: the same exact result."""
    monkeypatch.setattr(stats, "POOL_BATCHES", pool_every)
    x = _shifted(sum(SIZES))
    m_ref, v_ref, r_ref = _reference(x)
    mom, full = Moments(x.shape[1]), Moments(x.shape[1], outer=True)
    for i, b in enumerate(_batches(x)):
        mom.add(b)
        full.add(b)
        if pool_every == 1:
            assert not mom._pending
        elif i == 0:
            assert int(mom.count) == b.shape[0]  # reading pools what was added
    for st in (mom, full):
        assert int(st.count) == x.shape[0]
        assert torch.allclose(st.mean, m_ref, rtol=1e-12, atol=1e-6)
        assert ((st.var - v_ref).abs() / v_ref).max() < 1e-6
    assert ((full.cov().diagonal() - v_ref).abs() / v_ref).max() < 1e-6
    assert (full.corr() - r_ref).abs().max() < 1e-6


def test_one_batch_equals_many_batches_and_update_matches_add() -> None:
    x = _shifted(sum(SIZES), dtype=torch.float64)
    one, many, feats = Moments(x.shape[1], outer=True), Moments(x.shape[1], outer=True), Moments(x.shape[1])
    one.add(x)
    for b in _batches(x):
        many.add(b)
        feats.update(b.t())  # the C × M form
    for a, b in ((one.mean, many.mean), (one.var, many.var), (one.cov(), many.cov()), (one.var, feats.var)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-9)
    m_ref, v_ref, r_ref = _reference(x)
    assert ((one.var - v_ref).abs() / v_ref).max() < 1e-10
    assert (one.corr() - r_ref).abs().max() < 1e-10


def test_cross_moments_of_large_mean_float32_features() -> None:
    x = _shifted(sum(SIZES), c=8)
    xa, xb = x[:, :4], x[:, 4:].flip(1)
    _, v_ref, r_ref = _reference(torch.cat([xa, xb], 1))
    cm = CrossMoments(4, 4)
    for i, n in enumerate(SIZES):
        s = sum(SIZES[:i])
        cm.update(xa[s:s + n].t(), xb[s:s + n].t())
    assert ((torch.cat([cm.a.var, cm.b.var]) - v_ref).abs() / v_ref).max() < 1e-6
    assert (cm.corr() - r_ref[:4, 4:]).abs().max() < 1e-6


def test_conv_activations_in_float32_through_hooks() -> None:
    """Maps ``N×C×H×W`` (also channels-last) through ``stream_moments``: channels offset by 1e4·std."""
    g = torch.Generator().manual_seed(1)
    shift = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        shift.weight.copy_(torch.randn(4, 3, 1, 1, generator=g))
        assert shift.bias is not None
        shift.bias.copy_(torch.tensor([1e4, -2e4, 3e4, 5e3]))
    model = nn.Sequential(shift, nn.ReLU(inplace=True)).eval()  # ReLU overwrites the conv output in place
    xs = [torch.randn(n, 3, 5, 5, generator=g) for n in (8, 3, 17)]
    for layout in (torch.contiguous_format, torch.channels_last):
        loader = [x.contiguous(memory_format=layout) for x in xs]
        with torch.no_grad():
            ref = torch.cat([shift(x) for x in loader]).double().transpose(0, 1).reshape(4, -1)
        v_ref = ref.var(1, correction=0)
        mom = stream_moments([model], [["0"]], loader)[0]["0"]
        assert torch.allclose(mom.mean, ref.mean(1), rtol=1e-12)
        assert ((mom.var - v_ref).abs() / v_ref).max() < 1e-6


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "rows_with_remainder"])
@pytest.mark.parametrize("ratio", [0.0, 1.5, 0.95 * WELL_CONDITIONED])
def test_fused_moments_of_a_large_batch_match_float64(layout: str, ratio: float) -> None:
    """The uncentred fused path on a realistic batch (256 × 16 × 32 × 32): variance within 1e-6 relative and mean
    within 1e-6 std of a float64 two-pass reference, up to the conditioning limit."""
    g = torch.Generator().manual_seed(3)
    std = torch.linspace(0.05, 20, 16, dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(8)
    x64 = torch.randn(256, 16, 32, 32, generator=g, dtype=torch.float64) * std.view(1, 16, 1, 1)
    x64 = x64 - x64.mean((0, 2, 3), keepdim=True) + (ratio * sign * std).view(1, 16, 1, 1)
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "rows_with_remainder":  # M = 262,143 rows: 1023 partials of 256 rows and 255 rows left over
        x = x.permute(0, 2, 3, 1).reshape(-1, 16)[:-1]
    ref = (x.double().permute(0, 2, 3, 1) if x.dim() == 4 else x.double()).reshape(-1, 16)
    m_ref, v_ref = ref.mean(0), ref.var(0, correction=0)
    out = fused_moments(x)
    assert out is not None
    mean, m2 = out
    assert ((m2 / ref.shape[0] - v_ref).abs() / v_ref).max() < 1e-6
    assert ((mean - m_ref).abs() / v_ref.sqrt()).max() < 1e-6


def test_fused_moments_refuse_ill_conditioned_batches_and_moments_fall_back_exactly() -> None:
    """A channel beyond the conditioning limit (or constant and non-zero) makes the fused path refuse; Moments then
    centres that batch and every later one, and stays exact."""
    g = torch.Generator().manual_seed(4)
    good = torch.randn(FUSED_MIN_ROWS, 4, generator=g)
    assert fused_moments(good) is not None
    assert fused_moments(good + 2 * WELL_CONDITIONED) is None
    const = good.clone()
    const[:, 1] = 3.0
    assert fused_moments(const) is None
    bad = _shifted(FUSED_MIN_ROWS, c=4)  # |mean| = 1e4·std
    mom = Moments(4)
    mom.add(good[:100])  # a small batch is centred, without deciding the site's path
    assert mom.fused is None
    mom.add(good)
    assert mom.fused is True
    mom.add(bad)
    assert mom.fused is False
    mom.add(good)
    x = torch.cat([good[:100], good, bad, good])
    m_ref, v_ref, _ = _reference(x)
    assert ((mom.mean - m_ref).abs() / v_ref.sqrt()).max() < 1e-6
    assert ((mom.var - v_ref).abs() / v_ref).max() < 1e-6


def test_centred_rows_are_a_copy_in_the_activation_dtype() -> None:
    x = torch.randn(4, 3, 2, 2)
    b = centre(x)
    x.zero_()
    assert b.rows.dtype == torch.float32 and b.rows.shape == (16, 3)
    assert b.rows.abs().sum() > 0 and b.total.dtype == torch.float64


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x = _shifted(sum(SIZES))
        mine = _batches(x)[rank::world]  # unequal shares: sizes 100, 250, 1 vs 37, 13, 64
        mom, cm = Moments(x.shape[1], outer=True), CrossMoments(3, 3)
        for b in mine:
            mom.add(b)
            cm.update(b[:, :3].t(), b[:, 3:].t())
        mom.all_reduce()
        cm.all_reduce()
        torch.save({"count": mom.count, "mean": mom.mean, "var": mom.var, "corr": mom.corr(), "cross": cm.corr()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduce_combines_ranks_exactly_and_identically() -> None:
    x = _shifted(sum(SIZES))
    m_ref, v_ref, r_ref = _reference(x)
    with tempfile.TemporaryDirectory() as tmp:
        # fork: the ranks inherit this process's imports (spawn would import torch and this module again, ~6 s)
        mp.start_processes(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, start_method="fork")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    r = ranks[0]
    assert int(r["count"]) == x.shape[0]
    assert torch.allclose(r["mean"], m_ref, rtol=1e-12, atol=1e-6)
    assert ((r["var"] - v_ref).abs() / v_ref).max() < 1e-6
    assert (r["corr"] - r_ref).abs().max() < 1e-6
    assert (r["cross"] - r_ref[:3, 3:]).abs().max() < 1e-6


@pytest.mark.parametrize("path", ["fused", "centred"])
def test_activation_statistics_match_a_float64_reference(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross (activation matching) and full (ZipIt / CCA) statistics against float64 features recorded apart, with
    every batch taking the uncentred fused path (the threshold lowered to these small batches) or centred."""
    if path == "fused":
        monkeypatch.setattr(stats, "FUSED_MIN_ROWS", 1)
    else:
        monkeypatch.setattr(stats, "WELL_CONDITIONED", 0.0)
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet20", norm="bn", width=0.25)
    a, b = build_model(cfg).eval(), build_model(cfg).eval()
    g = torch.Generator().manual_seed(2)
    loader = [torch.randn(n, 3, 16, 16, generator=g) for n in (8, 5, 11)]
    spec = build_permutation_spec(a, loader[0][:2])
    cross = activation_statistics(a, b, spec, loader)
    full = activation_statistics(a, b, spec, loader, full=True)
    grp = spec.groups[0]
    keys = [(s.module, s.call, s.port) for s in grp.activation_sites]
    feats: list[torch.Tensor] = []
    with torch.no_grad(), statistics.record_sites(a, keys) as sa, statistics.record_sites(b, keys) as sb:
        for x in loader:
            a(x), b(x)
            feats += [torch.cat([sa[k], sb[k]]).t() for k in keys]
    _, v_ref, r_ref = _reference(torch.cat(feats))
    c = grp.size
    st, fu = cross[grp.name], full[grp.name]
    assert isinstance(st, CrossMoments) and isinstance(fu, Moments)
    assert torch.allclose(torch.cat([st.a.var, st.b.var]), v_ref, rtol=1e-5, atol=1e-9)
    assert torch.allclose(fu.var, v_ref, rtol=1e-5, atol=1e-9)
    assert (st.corr() - r_ref[:c, c:]).abs().max() < 1e-5
    assert (fu.corr() - r_ref).abs().max() < 1e-5


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("flush_every", [64, 2])
def test_activation_statistics_pool_batches_that_switch_to_the_centred_path(monkeypatch: pytest.MonkeyPatch,
                                                                              full: bool, flush_every: int) -> None:
    """Batches of one site taken by different paths (uncentred while well conditioned, then centred once a batch's
    |mean| ≫ std) are pooled exactly (at the end of the pass, or every two batches): equal to a float64 reference
    of all features, for the cross block and for the full ``2C × 2C`` moments."""
    monkeypatch.setattr(stats, "FUSED_MIN_ROWS", 1)
    monkeypatch.setattr(stats, "POOL_BATCHES", flush_every)
    calls: list[bool] = []
    real = stats.fused_partials

    def spy(x: torch.Tensor) -> tuple[stats.Partials, ...] | None:
        out = real(x)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(stats, "fused_partials", spy)
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval() for _ in range(2))
    g = torch.Generator().manual_seed(1)
    loader = [torch.randn(n, 4, generator=g) for n in (40, 17, 33)]
    loader += [torch.randn(n, 4, generator=g) * 1e-3 + 50.0 for n in (25, 30)]  # positive units: |mean| ≫ std
    spec = build_permutation_spec(a, loader[0][:2])
    got = activation_statistics(a, b, spec, loader, full=full)
    assert True in calls and False in calls  # both paths ran at the site
    (grp,) = spec.groups
    keys = [(s.module, s.call, s.port) for s in grp.activation_sites]
    with torch.no_grad(), statistics.record_sites(a, keys) as sa, statistics.record_sites(b, keys) as sb:
        feats = []
        for x in loader:
            a(x), b(x)
            feats += [torch.cat([sa[k], sb[k]]).t() for k in keys]
    m_ref, v_ref, r_ref = _reference(torch.cat(feats))
    st = got[grp.name]
    live = v_ref > 0
    if full:
        assert isinstance(st, Moments)
        count, mean, var, corr, r = st.count, st.mu, st.var, st.corr(), r_ref
    else:
        assert isinstance(st, CrossMoments)
        count, mean, var = st.a.count, torch.cat([st.a.mu, st.b.mu]), torch.cat([st.a.var, st.b.var])
        corr, r = st.corr(), r_ref[:6, 6:]
    assert int(count) == sum(x.shape[0] for x in loader)
    assert torch.allclose(mean, m_ref, rtol=1e-6, atol=1e-6)
    assert (((var - v_ref).abs()[live] / v_ref[live]) < 1e-5).all()
    assert (torch.nan_to_num(corr) - torch.nan_to_num(r)).abs().max() < 1e-5


@pytest.mark.parametrize("lockstep", [True, False])
def test_activation_statistics_copy_a_site_the_model_modifies_in_place_later(lockstep: bool,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A's activations are kept uncopied until B's hook; in two forwards, one that A's forward changes in place after
    its hook is detected by its version counter, A runs again copying it, and the statistics stay those of the
    hooked values. In lockstep B's hook comes before the change: the same statistics."""
    if not lockstep:
        monkeypatch.setattr(statistics, "_lockstep", lambda *args: None)

    class Later(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
            self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.relu1(self.conv1(x))
            y = self.relu2(self.conv2(h))
            h.mul_(0.5)  # after conv2 read it: relu1's output changes after its hook
            return self.head(y.mean((2, 3)))

    torch.manual_seed(0)
    cl = torch.channels_last  # the rows of channels-last maps view the activation itself: kept, not copied
    a, b = Later().eval().to(memory_format=cl), Later().eval().to(memory_format=cl)
    g = torch.Generator().manual_seed(5)
    loader = [torch.randn(n, 3, 8, 8, generator=g).contiguous(memory_format=cl) for n in (6, 9)]
    spec = build_permutation_spec(a, loader[0][:2])
    keys = [(s.module, s.call, s.port) for grp in spec.groups for s in grp.activation_sites]
    assert ("relu1", 0, "out") in keys
    got = activation_statistics(a, b, spec, loader)
    feats: dict[tuple[str, int, str], list[torch.Tensor]] = {}
    with torch.no_grad(), statistics.record_sites(a, keys) as sa, statistics.record_sites(b, keys) as sb:
        for x in loader:
            a(x), b(x)
            for k in keys:
                feats.setdefault(k, []).append(torch.cat([sa[k], sb[k]]).t())
    for grp in spec.groups:
        (site,) = grp.activation_sites
        _, v_ref, r_ref = _reference(torch.cat(feats[(site.module, site.call, site.port)]))
        st = got[grp.name]
        assert isinstance(st, CrossMoments)
        assert torch.allclose(torch.cat([st.a.var, st.b.var]), v_ref, rtol=1e-5, atol=1e-9)
        assert (st.corr() - r_ref[:8, 8:]).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["resnet20", "vgg11"])
def test_activation_statistics_in_lockstep_equal_those_of_two_forwards(arch: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Zoo pairs run in lockstep (each node of A, then B's), and every group's statistics are exactly those of the
    two separate forwards, for the cross block and the full moments."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, norm="bn", width=0.25)
    a, b = build_model(cfg).eval(), build_model(cfg).eval()
    g = torch.Generator().manual_seed(3)
    loader = [torch.randn(n, 3, 32, 32, generator=g) for n in (16, 7)]
    spec = build_permutation_spec(a, loader[0][:2])
    used: list[bool] = []
    real = statistics._lockstep
    monkeypatch.setattr(statistics, "_lockstep", lambda *args: used.append(True) or real(*args))
    for full in (False, True):
        got = activation_statistics(a, b, spec, loader, full=full)
        with monkeypatch.context() as m:
            m.setattr(statistics, "_lockstep", lambda *args: None)
            ref = activation_statistics(a, b, spec, loader, full=full)
        for name, st in got.items():
            other = ref[name]
            if isinstance(st, CrossMoments):
                assert isinstance(other, CrossMoments)
                assert torch.equal(st.comoment, other.comoment) and torch.equal(st.a.m2, other.a.m2)
                assert torch.equal(st.b.mu, other.b.mu)
            else:
                assert isinstance(other, Moments) and st.comoment is not None
                assert torch.equal(st.comoment, other.comoment) and torch.equal(st.mu, other.mu)
    assert used and real(a, b, [(s.module, s.call, s.port) for grp in spec.groups for s in grp.activation_sites])


def test_a_held_activation_changed_before_b_hook_is_detected_and_copied_from_then_on() -> None:
    """Lockstep: A's activation changed in place between its hook and B's (an in-place module reading a site at
    its input) is detected at B's hook; the batch is reported for a rerun and the site copied from then on."""
    rec = statistics._PairRecorder(None, False)
    k = ("relu", 0, "in")
    x = torch.randn(4, 8)
    rec.take(0, k, x)
    x.mul_(2.0)  # the module itself changes its input after the pre-hook
    rec.take(1, k, torch.randn(4, 8))
    assert rec.modified() == [k] and k in rec.copied
    rec.batch(k)
    y = torch.randn(4, 8)
    rec.take(0, k, y)
    y.mul_(2.0)
    rec.take(1, k, torch.randn(4, 8))
    assert rec.modified() == []  # copied at A's hook now: the change no longer reaches the kept rows
