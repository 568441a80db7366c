"""Vision Transformers through the one pipeline: the tracer's attention groups (residual stream, MLP units, heads and
within-head permutations), weight / activation matching over them, `vf merge` and the fit callbacks on a ViT pair."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from vf_lightning.callbacks import MergeCallback, VarianceCollapseCallback

from vf_lightning.align import (
    UnsupportedOpError,
    activation_matching,
    apply_permutation,
    build_permutation_spec,
    check_permutation_invariance,
    invert_perm,
    random_perms,
    weight_matching,
)
from vf_lightning.align.api import zip_matching
from vf_lightning.align.permute import head_perm
from vf_lightning.checkpoint import save_model_checkpoint
from vf_lightning.cli import main
from vf_lightning.data import FashionMNISTDataModule
from vf_lightning.lit import OptimConfig, PairModule
from vf_lightning.models import ModelConfig, build_model

TINY = ModelConfig(arch="vit", norm="ln", in_channels=1, image_size=28, num_classes=10, patch=7, dim=32, depth=2,
                   heads=4)


def _vit(seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY.to_dict(), **kw})  # type: ignore[arg-type]
    model = build_model(cfg).eval()
    with torch.no_grad():  # break the zero-bias / unit-LN symmetry of a fresh init so every axis matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


class UserAttention(nn.Module):
    """Attention as users write it: ``to_qkv(x).chunk(3, -1)``, view / transpose per head, SDPA, merge heads."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).contiguous().view(b, n, c))


class UserViT(nn.Module):
    """A user's own ViT: linear patch embedding of unfolded patches, mean pooling, post-norm-free blocks."""

    def __init__(self, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(49, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, 16, dim))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = UserAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = F.unfold(x, 7, stride=7).transpose(1, 2)  # batch × 16 patches × 49 pixels
        h = self.embed(tokens) + self.pos
        h = h + self.attn(self.ln1(h))
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(dim=1))


X = torch.randn(6, 1, 28, 28)


@pytest.mark.parametrize("attention", ["qkv", "sdpa", "mha"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_random_permutation_of_every_vit_group_keeps_the_logits(attention: str, pool: str) -> None:
    model = _vit(attention=attention, pool=pool)
    spec = build_permutation_spec(model, X[:2])
    by_heads = [g for g in spec if g.heads > 1]
    assert len(by_heads) == 2 * TINY.depth  # per block: the q·k group and the v·o group, one head set
    assert {g.head_set for g in by_heads} == {g.name for g in by_heads if g.axes[0].offset == 0} or attention == "mha"
    assert len(spec) == 1 + 3 * TINY.depth  # + the residual stream and one MLP-unit group per block
    assert check_permutation_invariance(model, spec, X, seed=1) <= 1e-4


def test_a_users_vit_with_chunked_qkv_and_sdpa_traces_and_self_checks() -> None:
    torch.manual_seed(0)
    model = UserViT().eval()
    spec = build_permutation_spec(model, X[:2])
    heads = [g for g in spec if g.heads > 1]
    assert [g.heads for g in heads] == [3, 3] and heads[0].head_set == heads[1].head_set
    assert check_permutation_invariance(model, spec, X, seed=2) <= 1e-4


def test_an_unsupported_op_fails_naming_the_node() -> None:
    class Cumulative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(self.fc(x), dim=-1)

    with pytest.raises(UnsupportedOpError, match="fx node 'cumsum'"):
        build_permutation_spec(Cumulative(), torch.randn(2, 8))


@pytest.mark.parametrize("attention", ["qkv", "mha"])
def test_weight_matching_undoes_a_planted_permutation_of_stream_units_heads_and_head_dims(attention: str) -> None:
    a = _vit(attention=attention)
    spec = build_permutation_spec(a, X[:2])
    planted = random_perms(spec, seed=3)
    b = apply_permutation(a, spec, planted).eval()
    res = weight_matching(spec, a.state_dict(), b.state_dict())
    assert all(torch.equal(res.perms[g.name], invert_perm(planted[g.name])) for g in spec)
    assert (res.aligned_b(b)(X) - a(X)).abs().max() <= 1e-5


def test_activation_matching_undoes_a_planted_permutation_through_the_qkv_chunk_sites() -> None:
    a = _vit()
    spec = build_permutation_spec(a, X[:2])
    b = apply_permutation(a, spec, random_perms(spec, seed=4)).eval()
    data = [torch.randn(32, 1, 28, 28) for _ in range(2)]
    res = activation_matching(a, b, spec, data)
    assert (res.aligned_b(b)(X) - a(X)).abs().max() <= 1e-5


def test_head_matching_recovers_a_planted_permutation_of_whole_heads() -> None:
    a = _vit()
    spec = build_permutation_spec(a, X[:2])
    order = torch.tensor([2, 0, 3, 1])
    planted = {g.name: (head_perm(order, [torch.arange(g.head_dim)] * g.heads) if g.heads > 1
                        else torch.arange(g.size)) for g in spec}  # fmt: skip
    b = apply_permutation(a, spec, planted).eval()
    res = weight_matching(spec, a.state_dict(), b.state_dict())
    for g in spec:
        assert torch.equal(res.perms[g.name], invert_perm(planted[g.name])), g.name
    heads = next(g for g in spec if g.heads > 1)
    moved = res.perms[heads.name].view(heads.heads, heads.head_dim)[:, 0] // heads.head_dim
    assert moved.tolist() == invert_perm(order).tolist()


def test_zipit_refuses_attention_head_groups_in_one_line() -> None:
    a, b = _vit(0), _vit(1)
    spec = build_permutation_spec(a, X[:2])
    with pytest.raises(ValueError, match="does not handle attention-head groups.*use matching 'weight' or"):
        zip_matching(a, b, spec, [X])


def test_vf_merge_on_a_tiny_vit_pair_writes_the_report_contract(tmp_path: Path, fmnist: Path) -> None:
    paths = []
    for i, name in enumerate("ab"):
        paths.append(tmp_path / f"{name}.pt")
        save_model_checkpoint(_vit(i), TINY, paths[-1])
    out = tmp_path / "merge"
    cb = "vf_lightning.callbacks."
    small = {"calib_samples": None, "eval_samples": None, "batch_size": 250}
    cfg = {
        "trainer": {"accelerator": "cpu", "logger": False, "callbacks": [
            {"class_path": cb + "MergeCallback", "init_args": {"matchings": ["identity", "weight", "activation"],
                                                               "normalizations": ["none", "repair"],
                                                               "ensemble": True, **small}},
            {"class_path": cb + "PFMCallback", "init_args": {"matchings": ["weight"], "preserve": [2, -1],
                                                             "normalizations": ["none", "repair"], **small}},
            {"class_path": cb + "InterpolationCallback", "init_args": {"matchings": ["weight"], "alphas": 3,
                                                                       "normalizations": ["none"], **small}},
            {"class_path": cb + "VarianceCollapseCallback", "init_args": {"matchings": ["weight"],
                                                                          "normalizations": ["none", "repair"],
                                                                          **small}},
            {"class_path": cb + "ReportWriter", "init_args": {"out_dir": str(out)}}]},
        "model": {"class_path": "vf_lightning.lit.MergeModule", "init_args": {"checkpoints": [str(p) for p in paths]}},
        "data": {"class_path": "vf_lightning.data.FashionMNISTDataModule",
                 "init_args": {"pad_to_32": False, "calib_samples": 128, "val_subset": 500, "eval_batch_size": 250,
                               "num_workers": 0}},
    }  # fmt: skip
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    main(["merge", "--config", str(tmp_path / "merge.yaml")])
    report = json.loads((out / "report.json").read_text())
    for key in ("config", "endpoints", "ensemble", "alignment", "results", "lmc", "variance_ratio", "timing"):
        assert key in report
    for method in ("weight", "activation"):
        info = report["alignment"][method]
        assert info["max_abs_logit_diff"] < 1e-4 and info["self_check"] < 1e-4 and info["groups"] == 7
    rows = report["results"]
    assert {(r["matching"], r["normalization"]) for r in rows if r["preserved_layers"] == 0} == {
        (m, n) for m in ("identity", "weight", "activation") for n in ("none", "repair")}
    pfm = [r for r in rows if r["preserved_layers"] > 0]
    assert {r["preserved_layers"] for r in pfm} == {2, 6}  # 2 blocks × (attention, MLP) + stream + classifier
    top = next(r for r in pfm if r["preserved_layers"] == 6 and r["normalization"] == "none")
    assert top["acc"] == pytest.approx(report["ensemble"]["acc"], abs=1e-9)
    vr = report["variance_ratio"]
    assert "blocks.1.fc1" in vr["layers"] and all(len(c) == len(vr["layers"]) for c in vr["curves"].values())
    assert (out / "merged.pt").is_file() and (out / "report.html").is_file()


def test_fit_callbacks_run_on_a_tiny_vit_pair(tmp_path: Path, fmnist: Path) -> None:
    small = {"calib_samples": 128, "eval_samples": 128, "batch_size": 128}
    cbs = [MergeCallback(matchings=["weight"], normalizations=["none", "repair"], **small),
           VarianceCollapseCallback(matchings=["weight"], normalizations=["repair"], **small)]
    data = FashionMNISTDataModule(num_workers=0, train_subset=256, val_subset=128, batch_size=64, pad_to_32=False,
                                  calib_samples=128, augment=False)  # fmt: skip
    model = PairModule(net=TINY, optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.0))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=cbs,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics
    for key in ("merge/weight/none/acc", "merge/weight/repair/acc", "variance/weight/repair/mean"):
        assert key in metrics and torch.isfinite(metrics[key])


def test_vf_prune_on_a_tiny_vit_reaches_the_sparsity_and_normalizes(tmp_path: Path, fmnist: Path) -> None:
    ckpt = tmp_path / "a.pt"
    save_model_checkpoint(_vit(0), TINY, ckpt)
    out = tmp_path / "prune"
    main(["prune", "--checkpoint", str(ckpt), "--sparsities", "[0.5]", "--normalization", "[none, repair]",
          "--out_dir", str(out), "--trainer.logger", "false", "--data", "vf_lightning.data.FashionMNISTDataModule",
          "--data.pad_to_32", "false", "--data.calib_samples", "128", "--data.val_subset", "500",
          "--data.num_workers", "0"])  # fmt: skip
    rows = [r for r in json.loads((out / "report.json").read_text())["results"] if r.get("sparsity") == 0.5]
    assert {r["normalization"] for r in rows} >= {"none", "repair"}
    assert rows and all(abs(r["achieved_sparsity"] - 0.5) < 0.01 for r in rows)
