"""Preserve-First Merging (method-spec §7): keep the first layers of both models, merge the rest.

Layers and positions come from the traced permutation spec, never from module names. Every group of the
spec is one feature space; groups are ordered by the forward position of their last writer (conv/linear or
norm), which puts a residual stream after the blocks that write into it (ZipIt's PREFIX order). With ``k``
preserved layers (``1 ≤ k ≤ n_groups + 1``) the first ``k − 1`` groups stay *unmerged*; the model input
counts as unmerged and the model output as merged. A conv/linear whose output space is merged but whose
input is not is a *transition*. ``k = 0`` is the full merge (identical to ``k = 1``, whose only transition
reads the input), ``k = n_groups + 1`` is the ensemble (the transition is the classifier).

:class:`PFMModel` is explicit: ``a`` / ``b`` are the two transformed base models cut after the transitions
(only what those need runs; a residual base keeps its own stream as far as its preserved blocks need it),
``merged`` is the merged model from the transitions on. At each transition ``T`` the outputs of both
transformed bases, ``M_A·T_A(h_A)`` and ``M_B·T_B(h_B)`` (already in the merged basis), are averaged by a
*mixer* registered under ``T``'s name in ``merged``: a grouped 1×1 convolution over the interleaved pair
with weights ``(½, ½)`` per channel (``2C`` parameters; the reference's "merge acts" cost). Because the
mixer is an ordinary Conv layer, RESET / REPAIR / RESCALE measure, correct and fold the transition output
like any other layer of the merged part, without touching the base models. For residual nets the merged
stream of the preserved part is rebuilt by the merged model itself from averaged transition outputs,
merged norms and its own shortcut additions (method-spec §7.3). Base models are transformed only in the
merged groups (preserved groups keep their weights), as in the reference. Only modules that run are
registered, so ``state_dict`` and the parameter / FLOP counts cover exactly the PFM system (open question
Q6: a ResNet transition conv is counted in both bases, the way it actually runs).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from vf_lightning.align.graph import AFFINE_TYPES, ModelGraph
from vf_lightning.align.permute import identity_perms
from vf_lightning.align.results import AlignmentResult
from vf_lightning.align.spec import PermutationSpec
from vf_lightning.align.transforms import merge_models, model_maps, transform_model
from vf_lightning.diagnostics.complexity import count_flops, count_params
from vf_lightning.distributed import evaluate_heads_reduced
from vf_lightning.io import atomic_torch_save
from vf_lightning.models import ModelConfig, build_model
from vf_lightning.repair import (
    WEIGHT_ONLY,
    Goals,
    calibration_inputs,
    combine_goals,
    ensure_biases,
    get_normalization,
    inference_copy,
    normalize,
    reference_stats,
)
from vf_lightning.repair.fold import replace_submodule
from vf_lightning.repair.sites import batchnorm_sites
from vf_lightning.stats import model_device

PFM_FORMAT = "vf-pfm"
Maps = dict[str, tuple[torch.Tensor, torch.Tensor]]
EvaluateFn = Callable[[Sequence["PFMModel"]], Sequence[Mapping[str, float]]]


class PFMError(ValueError):
    """The model graph or the arguments do not allow Preserve-First Merging."""


# ----------------------------------------------------------------------------------------------------------------
# structure: layer order and transitions


@dataclass(frozen=True)
class PFMLayout:
    """Which feature spaces exist, their preservation order, and how each conv/linear connects them.

    ``layers`` are feature spaces in preservation order, named by a spec group; ``members`` lists a layer's groups
    when it has several (the groups of one attention head set, written by one fused projection, are preserved
    or merged together); ``out_group`` / ``in_group`` give each conv/linear module's output / input group
    (``None`` = fixed basis: the model input or output).
    """

    layers: tuple[str, ...]
    out_group: dict[str, str | None]
    in_group: dict[str, str | None]
    outputs: tuple[str, ...]
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def max_preserved(self) -> int:
        """The ensemble position ``n_groups + 1`` (every feature space preserved, classifier averaged)."""
        return len(self.layers) + 1

    def unmerged(self, preserved: int) -> set[str]:
        """Groups kept unmerged with ``preserved`` layers: the first ``preserved − 1``."""
        self.check(preserved)
        return {g for layer in self.layers[: max(preserved - 1, 0)] for g in self.members.get(layer, (layer,))}

    def transitions(self, preserved: int) -> list[str]:
        """Conv/linear modules writing a merged space from an unmerged input (empty for ``preserved = 0``)."""
        self.check(preserved)
        if preserved == 0:
            return []
        keep = self.unmerged(preserved)
        return [m for m in self.out_group
                if self.out_group[m] not in keep and (self.in_group[m] is None or self.in_group[m] in keep)]

    def check(self, preserved: int) -> None:
        if not 0 <= preserved <= self.max_preserved:
            raise PFMError(f"preserved layers must be in 0..{self.max_preserved} for this model "
                           f"({len(self.layers)} feature spaces + the classifier), got {preserved}")


def pfm_layout(spec: PermutationSpec, graph: ModelGraph) -> PFMLayout:
    """Order the spec's groups for PFM (last writer in forward order) and map conv/linear modules to groups."""
    owner_out: dict[str, str] = {}
    owner_in: dict[str, str] = {}
    writers: dict[str, set[str]] = {}
    for g in spec.groups:
        for ax in g.axes:
            module = ax.key.rsplit(".", 1)[0]
            if ax.role == "out":
                writers.setdefault(g.name, set()).add(module)
                if ax.kind == "producer" and ax.key.endswith(".weight") and ax.axis == 0:
                    owner_out[module] = g.name
            elif ax.key.endswith(".weight") and ax.axis == 1:
                owner_in[module] = g.name
    position: dict[str, int] = {}
    for i, node in enumerate(graph.gm.graph.nodes):
        if node.op != "call_module":
            continue
        for group, mods in writers.items():
            if str(node.target) in mods:
                position[group] = i
    missing = [g.name for g in spec.groups if g.name not in position]
    if missing:
        raise PFMError(f"feature space(s) {missing} have no conv/linear/norm writer in the traced graph; "
                       "PFM needs every permutation group to be produced by a layer")
    affine = graph.producers
    shared = [m for m in affine if len(graph.calls(m)) > 1]
    if shared:
        raise PFMError(f"conv/linear module(s) {shared} are called more than once per forward; PFM cannot cut a "
                       "graph at a shared layer")
    members: dict[str, tuple[str, ...]] = {}
    for g in spec.groups:  # one layer per attention head set, at its last writer
        if g.heads > 1:
            members[g.head_set] = members.get(g.head_set, ()) + (g.name,)
    folded = {g: layer for layer, gs in members.items() for g in gs}
    layer_pos: dict[str, int] = {}
    for name, pos in position.items():
        layer = folded.get(name, name)
        layer_pos[layer] = max(layer_pos.get(layer, pos), pos)
    layers = tuple(sorted(layer_pos, key=lambda g: layer_pos[g]))
    out_group = {m: owner_out.get(m) for m in affine}
    in_group = {m: owner_in.get(m) for m in affine}
    outputs = tuple(graph.output_layers)
    if not outputs:
        raise PFMError("no output layer found (a conv/linear from which the model output is reached directly)")
    return PFMLayout(layers, out_group, in_group, outputs, {k: v for k, v in members.items() if len(v) > 1})


def _identity_maps(spec: PermutationSpec, device: torch.device) -> Maps:
    out: Maps = {}
    for g in spec.groups:
        eye = torch.eye(g.size, dtype=torch.float64, device=device)
        out[g.name] = (eye, eye)
    return out


# ----------------------------------------------------------------------------------------------------------------
# graph surgery


def _suffix_graph(graph: fx.Graph, transitions: Sequence[str]) -> fx.Graph:
    """``graph`` with transition ``i`` replaced by its mixer applied to the extra placeholder ``pfm_in_i``."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    nodes = list(graph.nodes)
    for node in nodes:
        if node.op == "placeholder":
            env[node] = new.node_copy(node)
    extra = [new.placeholder(f"pfm_in_{i}") for i in range(len(transitions))]
    index = {t: i for i, t in enumerate(transitions)}
    for node in nodes:
        if node.op == "placeholder":
            continue
        if node.op == "call_module" and str(node.target) in index:
            i = index[str(node.target)]
            env[node] = new.call_module(str(node.target), (extra[i],))
        else:
            env[node] = new.node_copy(node, lambda n: env[n])
    return new


def _graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``graph`` over ``root``'s modules with dead code and the modules it no longer calls removed."""
    gm = fx.GraphModule(root, graph)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


class LinearPairMixer(nn.Module):
    """The mixer of a Linear transition: features on the last dim (``N×2C`` or ``N×L×2C`` tokens) fed to the
    grouped 1×1 ``conv`` as ``M×2C×1×1`` and shaped back, so the correction sites see an ordinary conv."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.reshape(-1, x.shape[-1], 1, 1))
        return y.reshape(*x.shape[:-1], y.shape[1])


def _mixer(layer: nn.Module) -> nn.Module:
    """Averages an interleaved pair ``[y_A0, y_B0, y_A1, …]`` per channel: grouped 1×1 conv, weights ``(½, ½)``.

    Conv layers get a mixer of the same dimensionality; Linear layers a 2-d one inside a :class:`LinearPairMixer`.
    """
    if isinstance(layer, nn.Linear):
        conv: type[nn.Module] = nn.Conv2d
        channels = layer.out_features
    elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        conv, channels = type(layer), layer.out_channels
    else:
        raise PFMError(f"transition layers must be Conv or Linear, got {type(layer).__name__}")
    w = layer.weight
    assert isinstance(w, torch.Tensor)
    mixer = conv(2 * channels, channels, 1, groups=channels, bias=False)  # type: ignore[call-arg]
    with torch.no_grad():
        mixer.weight.fill_(0.5)  # type: ignore[operator]
    mixer = mixer.to(device=w.device, dtype=w.dtype)
    return LinearPairMixer(mixer) if isinstance(layer, nn.Linear) else mixer


# ----------------------------------------------------------------------------------------------------------------
# the module


class PFMModel(nn.Module):
    """Two preserved prefixes (``a``, ``b``) whose transition outputs are averaged into the merged rest.

    ``preserved`` is the number of preserved layers, ``transitions`` the transition modules (names in the
    original model), ``layers`` the feature spaces in preservation order. With no transition (``preserved =
    0``) ``merged`` is the plain merged model and ``a`` / ``b`` are ``None``.
    """

    def __init__(self, a: nn.Module | None, b: nn.Module | None, merged: nn.Module, preserved: int,
                 transitions: Sequence[str], linear: Sequence[bool], layers: Sequence[str],
                 outputs: Sequence[str]) -> None:
        super().__init__()
        self.a = a
        self.b = b
        self.merged = merged
        self.preserved = int(preserved)
        self.transitions = list(transitions)
        self.linear = [bool(f) for f in linear]  # per transition: a Linear (features on the last dim)
        self.layers = list(layers)
        self.outputs = list(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a is None or self.b is None:
            return self.merged(x)
        return self.merged(x, *self.pairs(x))

    def pairs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Both prefixes' transition outputs, interleaved per channel: the merged part's inputs besides ``x``."""
        assert self.a is not None and self.b is not None, "the full merge (preserved = 0) has no prefixes"
        return _interleave(self.a(x), self.b(x), self.linear)

    def merged_sites(self, sites: Sequence[str] | None = None) -> list[str]:
        """Conv/linear outputs of the merged part (transitions included, output layers excluded), PFM names;
        with ``sites`` (base-model correction sites) only those."""
        return [site for site, _ in self.merged_site_layers(sites)]

    def merged_site_layers(self, sites: Sequence[str] | None = None) -> list[tuple[str, str]]:
        """``(PFM site, base-model layer)`` of :meth:`merged_sites` (a Linear transition's site is its mixer's conv)."""
        keep = None if sites is None else set(sites)
        mixers = {n for n, m in self.merged.named_modules() if isinstance(m, LinearPairMixer)}
        found = []
        for n, m in self.merged.named_modules():
            layer = n.removesuffix(".conv") if n.removesuffix(".conv") in mixers else n
            if isinstance(m, AFFINE_TYPES) and layer not in self.outputs and (keep is None or layer in keep):
                found.append((f"merged.{n}", layer))
        return found

    def merged_batchnorms(self) -> list[str]:
        """BatchNorm layers of the merged part (the ones RESET re-estimates), PFM names."""
        return [f"merged.{n}" for n in batchnorm_sites(self.merged)]

    def params_ratio(self, base: nn.Module) -> float:
        """Parameters of this system / parameters of one base model (1 for the full merge, ≈2 for the ensemble)."""
        return count_params(self) / count_params(base)

    def flops_ratio(self, base: nn.Module, example_input: torch.Tensor) -> float:
        """Forward FLOPs of this system / FLOPs of one base model on ``example_input``."""
        return count_flops(self, example_input) / count_flops(base, example_input)


def _interleave(ya: Sequence[torch.Tensor], yb: Sequence[torch.Tensor], linear: Sequence[bool]) -> list[torch.Tensor]:
    """The prefixes' transition outputs interleaved per channel (A0, B0, A1, B1, ...), one tensor per transition."""
    pairs = []
    for i, lin in enumerate(linear):
        if lin:  # Linear outputs: features on the last dim
            pairs.append(torch.stack([ya[i], yb[i]], -1).flatten(-2))
        else:  # conv outputs: channels (dim 1)
            pairs.append(torch.stack([ya[i], yb[i]], 2).flatten(1, 2))
    return pairs


def _same_weights(m1: nn.Module | None, m2: nn.Module | None) -> bool:
    if m1 is None or m2 is None:
        return m1 is m2
    s1, s2 = m1.state_dict(), m2.state_dict()
    return list(s1) == list(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)


class PFMGroup(nn.Module):
    """PFM variants of one depth evaluated in one pass: every distinct preserved prefix runs once per batch, then
    every merged part; the forward returns one logits tensor per variant (evaluate with
    :func:`vf_lightning.evaluate.evaluate_heads`). The normalizations of one system share both prefixes, and the
    matchings of one pair usually share A's (B is aligned to A, so A's preserved layers and transitions keep A's
    weights). At depth ``k`` the prefixes are most of a system's cost (all of it for the ensemble)."""

    def __init__(self, variants: Sequence[PFMModel]) -> None:
        super().__init__()
        if not variants:
            raise PFMError("PFMGroup needs at least one PFM variant")
        first = variants[0]
        for v in variants[1:]:
            if v.transitions != first.transitions or v.linear != first.linear or (v.a is None) != (first.a is None):
                raise PFMError("PFMGroup: the variants must have one depth (the same transition layers); "
                               f"got {first.transitions} and {v.transitions}")  # fmt: skip
        self.variants = nn.ModuleList(variants)
        self.a_prefixes, self.b_prefixes = nn.ModuleList(), nn.ModuleList()
        self.index: list[tuple[int, int]] = []  # per variant: its A and B prefixes among the distinct ones
        if first.a is not None:
            for v in variants:
                assert v.a is not None and v.b is not None
                self.index.append((_distinct(self.a_prefixes, v.a), _distinct(self.b_prefixes, v.b)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.index:
            return [v(x) for v in self.variants]
        ya = [p(x) for p in self.a_prefixes]
        yb = [p(x) for p in self.b_prefixes]
        linear = self.variants[0].linear  # type: ignore[union-attr]
        pairs: dict[tuple[int, int], list[torch.Tensor]] = {}
        out = []
        for v, (i, j) in zip(self.variants, self.index):
            if (i, j) not in pairs:
                pairs[(i, j)] = _interleave(ya[i], yb[j], linear)  # type: ignore[arg-type]
            out.append(v.merged(x, *pairs[(i, j)]))  # type: ignore[operator]
        return out


def _distinct(kept: nn.ModuleList, prefix: nn.Module) -> int:
    """The index in ``kept`` of a prefix with ``prefix``'s weights, appending ``prefix`` if none has them."""
    for i, other in enumerate(kept):
        if _same_weights(other, prefix):
            return i
    kept.append(prefix)
    return len(kept) - 1


def evaluate_variants(variants: Sequence[PFMModel], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      device: torch.device | str) -> list[dict[str, float]]:  # fmt: skip
    """``{"acc", "loss"}`` of each variant of one depth over this rank's batches, reduced over ranks: one pass of
    their :class:`PFMGroup` (BatchNorms folded, :func:`~vf_lightning.repair.inference_copy`)."""
    return evaluate_heads_reduced(inference_copy(PFMGroup(variants)), batches, device, len(variants))


# ----------------------------------------------------------------------------------------------------------------
# building


class PreserveFirstMerger:
    """Builds :class:`PFMModel` s of any depth for one aligned pair, reusing the trace, merge and statistics.

    The merged model (average of the fully transformed models) is computed once: its part after any set of
    transitions only involves merged groups, so it serves every depth. Goal statistics for REPAIR-style
    corrections are measured once on the fully transformed base models (:meth:`goals`) and reused.
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module, alignment: AlignmentResult,
                 merged: nn.Module | None = None) -> None:  # fmt: skip
        self.model_a, self.model_b = model_a, model_b
        self.spec = alignment.spec
        self.transforms = alignment.transforms
        self.device = model_device(model_a)
        self.model_graph = ModelGraph.of(model_a)
        self.graph = self.model_graph.gm.graph
        self.layout = pfm_layout(self.spec, self.model_graph)
        self._merged: dict[str, nn.Module] = {} if merged is None else {"none": merged.eval()}
        self._bases: dict[int, tuple[nn.Module, nn.Module]] = {}
        self._stats: tuple[Iterable[object], int | None, list[Goals]] | None = None

    @property
    def max_preserved(self) -> int:
        return self.layout.max_preserved

    def merged(self, normalization: str = "none") -> nn.Module:
        """The plain merged model, or a weight-only normalization of it (``bias_calibration``, ``zero_bias``, any
        normalization registered with ``weights_only=True``); cached."""
        if "none" not in self._merged:
            self._merged["none"] = merge_models(self.model_a, self.model_b, self.spec, self.transforms).eval()
        if normalization not in self._merged:
            if normalization not in WEIGHT_ONLY:
                raise PFMError(f"{normalization!r} is not a weight-only normalization of the merged model")
            self._merged[normalization] = normalize(self._merged["none"], normalization).eval()
        return self._merged[normalization]

    def transformed(self) -> tuple[nn.Module, nn.Module]:
        """A and B fully transformed into the merged basis (the reference models for goal statistics)."""
        return self._transformed_bases(None)

    def _transformed_bases(self, preserved: int | None) -> tuple[nn.Module, nn.Module]:
        key = -1 if preserved is None else preserved
        if key not in self._bases:
            keep = set() if preserved is None else self.layout.unmerged(preserved)
            eye = _identity_maps(self.spec, self.device)
            pair = []
            for model, which in ((self.model_a, "a"), (self.model_b, "b")):
                maps = model_maps(self.transforms, which)
                maps = {g: (eye[g] if g in keep else maps[g]) for g in maps}
                pair.append(transform_model(model, self.spec, maps).eval())
            self._bases[key] = (pair[0], pair[1])
        return self._bases[key]

    def build(self, preserved: int, merged: nn.Module | None = None) -> PFMModel:
        """The PFM system with ``preserved`` layers; ``merged`` overrides the plain merged model."""
        lay = self.layout
        trans = lay.transitions(preserved)
        base_merged = merged if merged is not None else self.merged()
        if not trans:
            return PFMModel(None, None, copy.deepcopy(base_merged).eval(), preserved, [], [], lay.layers,
                            lay.outputs)
        base_a, base_b = self._transformed_bases(preserved)
        a = self.model_graph.truncated(trans, root=copy.deepcopy(base_a))
        b = self.model_graph.truncated(trans, root=copy.deepcopy(base_b))
        root = copy.deepcopy(base_merged)
        linear = [isinstance(self.model_a.get_submodule(t), nn.Linear) for t in trans]
        for t in trans:
            replace_submodule(root, t, _mixer(root.get_submodule(t)))
        suffix = _graph_module(root, _suffix_graph(self.graph, trans))
        self._check_merged_part(suffix, preserved, set(trans))
        return PFMModel(a, b, suffix, preserved, trans, linear, lay.layers, lay.outputs).eval()

    def _check_merged_part(self, suffix: nn.Module, preserved: int, transitions: set[str]) -> None:
        keep = self.layout.unmerged(preserved)
        live = {n for n, _ in suffix.named_modules()}
        for g in self.spec.groups:
            if g.name not in keep:
                continue
            for ax in g.axes:
                module = ax.key.rsplit(".", 1)[0]
                if module in live and module not in transitions:
                    raise PFMError(f"the merged part of the PFM model at preserved={preserved} uses {ax.key!r}, "
                                   f"which belongs to the preserved feature space {g.name!r}; this graph reads "
                                   "preserved features other than through a conv/linear layer")

    # -- statistics and normalization ------------------------------------------------------------------------
    def goal_sites(self) -> list[str]:
        """Every conv/linear except the output layers (superset of the merged-part sites of any depth)."""
        return [m for m in self.layout.out_group if m not in self.layout.outputs]

    def goals(self, loader: Iterable[object], max_samples: int | None = None, one_ref: bool = False) -> Goals:
        """Goals ``½(μ_A' + μ_B')``, ``½(σ_A' + σ_B')`` of the transformed models (A' only with ``one_ref``).

        One pass over ``loader``; repeated calls with the same loader object and ``max_samples`` reuse it.
        """
        cached = self._stats
        if cached is None or cached[0] is not loader or cached[1] != max_samples:
            ta, tb = self.transformed()
            cached = (loader, max_samples, reference_stats([ta, tb], loader, self.goal_sites(), max_samples))
            self._stats = cached
        stats = cached[2]
        return combine_goals(stats[:1], [1.0]) if one_ref else combine_goals(stats, [0.5, 0.5])

    def variant(self, preserved: int, normalization: str, loader: Iterable[object] | None = None,
                goals: Goals | None = None, max_samples: int | None = None, one_ref: bool = False,
                eps: float = 1e-5, sites: Sequence[str] | None = None) -> PFMModel:
        """The PFM system at ``preserved`` layers with a registered ``normalization`` applied to its merged part.

        Weight-only normalizations act on the merged model before the system is built; every other one (RESET,
        REPAIR, RESCALE, RESHIFT, or one a user registered) runs on the PFM system restricted to the merged part:
        its correction sites (``sites``: base-model correction sites, default every merged conv/linear) and its
        BatchNorms, so the preserved prefixes keep their weights and statistics. ``goals`` are keyed by
        base-model module names (default :meth:`goals`).
        """
        get_normalization(normalization)  # unknown names fail listing the registered ones
        if normalization in WEIGHT_ONLY:
            return self.build(preserved, self.merged(normalization))
        pfm = self.build(preserved)
        if normalization == "none":
            return pfm
        if loader is None:
            raise PFMError(f"normalization {normalization!r} needs a calibration loader")
        site_goals = None
        if normalization != "reset":
            site_goals = pfm_goals_for(goals if goals is not None else self.goals(loader, max_samples, one_ref), pfm,
                                       sites)  # fmt: skip
        return normalize(pfm, normalization, loader, goals=site_goals, sites=pfm.merged_sites(sites),
                         bn_sites=pfm.merged_batchnorms(), max_samples=max_samples, eps=eps).eval()  # type: ignore[return-value]


def build_pfm(model_a: nn.Module, model_b: nn.Module, alignment: AlignmentResult, preserved: int) -> PFMModel:
    """The PFM system of ``model_a`` and ``model_b`` (aligned by ``alignment``) with ``preserved`` layers."""
    return PreserveFirstMerger(model_a, model_b, alignment).build(preserved)


def max_preserved(model: nn.Module, example_input: torch.Tensor, spec: PermutationSpec | None = None) -> int:
    """Largest number of preserved layers for ``model`` (feature spaces + 1; the ensemble)."""
    graph = ModelGraph.of(model)
    spec = spec if spec is not None else graph.spec(example_input)
    return pfm_layout(spec, graph).max_preserved


def pfm_goals_for(goals: Goals, pfm: PFMModel, sites: Sequence[str] | None = None) -> Goals:
    """``goals`` keyed by base-model module names, renamed to the merged-part sites of ``pfm``."""
    mean, std = {}, {}
    for site, name in pfm.merged_site_layers(sites):
        if name not in goals.mean:
            raise KeyError(f"no goal statistics for {name!r}; compute goals over every conv/linear layer "
                           "(PreserveFirstMerger.goals)")
        mean[site], std[site] = goals.mean[name], goals.std[name]
    return Goals(mean, std)


# ----------------------------------------------------------------------------------------------------------------
# sweep


@dataclass
class PFMSource:
    """One matching of the pair for :func:`pfm_sweep`: its alignment and, from a merge session, optionally its goal
    statistics (keyed by base-model names) and plain merged model."""

    alignment: AlignmentResult
    goals: Goals | None = None
    merged: nn.Module | None = None


def pfm_sweep(
    model_a: nn.Module,
    model_b: nn.Module,
    alignment: AlignmentResult | Mapping[str, PFMSource],
    preserved_list: Sequence[int],
    normalizations: Sequence[str],
    calib_loader: Iterable[object] | None,
    evaluate_fn: EvaluateFn,
    example_input: torch.Tensor,
    max_samples: int | None = None,
    one_ref: bool = False,
    eps: float = 1e-5,
    on_variant: Callable[[PFMModel, dict[str, Any]], None] | None = None,
    goals: Goals | None = None,
    sites: Sequence[str] | None = None,
    merged: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every ``(preserved, normalization)`` PFM variant; one trace, merge and goal-statistics pass.

    Rows ``{"preserved_layers", "normalization", "acc", "loss", "params_ratio", "flops_ratio", "seconds"}``
    (``seconds`` = building and normalizing the variant, without evaluation). ``evaluate_fn(variants)`` gets the
    variants of one depth and returns one ``{"acc", "loss"}`` per variant (:func:`evaluate_variants` runs them in
    one pass, each distinct preserved prefix once); ``on_variant(pfm, row)`` sees each variant (e.g. to keep or
    save the best one). ``goals`` (keyed by base-model names, covering :meth:`PreserveFirstMerger.goal_sites`),
    ``sites`` (the correction sites) and ``merged`` (the plain merged model) may come from a merge session.
    ``alignment`` may also be ``{matching: PFMSource}``: several matchings of the pair swept depth by depth, a
    depth's variants of every matching evaluated together (they share A's prefix); rows then carry ``matching``,
    in matching order.
    """
    several = not isinstance(alignment, AlignmentResult)
    if several and (goals is not None or merged is not None):
        raise PFMError("pfm_sweep over several matchings takes each one's goals and merged model in its PFMSource")
    sources = {"": PFMSource(alignment, goals, merged)} if isinstance(alignment, AlignmentResult) else dict(alignment)
    for n in normalizations:
        get_normalization(n)
    mergers = {name: PreserveFirstMerger(model_a, model_b, src.alignment, src.merged) for name, src in sources.items()}
    for merger in mergers.values():
        for k in preserved_list:
            merger.layout.check(k)
    data = calibration_inputs(calib_loader, max_samples) if calib_loader is not None else None
    need = any(n not in ("none", "reset", *WEIGHT_ONLY) for n in normalizations)
    goal_of = {name: src.goals for name, src in sources.items()}
    for name, src in sources.items():
        if src.goals is None and need and data is not None:
            goal_of[name] = mergers[name].goals(data, None, one_ref)
    base_flops = count_flops(model_a, example_input)
    base_params = count_params(model_a)
    rows: list[dict[str, Any]] = []
    for k in preserved_list:
        built = []
        for name, merger in mergers.items():
            for norm in normalizations:
                t0 = time.perf_counter()
                pfm = merger.variant(k, norm, data, goal_of[name], None, one_ref, eps, sites)
                built.append((name, norm, pfm, time.perf_counter() - t0))
        first = built[0][2]
        ratios = (count_params(first) / base_params, count_flops(first, example_input) / base_flops)
        results = evaluate_fn([pfm for _, _, pfm, _ in built])
        for (name, norm, pfm, seconds), res in zip(built, results, strict=True):
            row = {**({"matching": name} if several else {}), "preserved_layers": k, "normalization": norm,
                   "acc": float(res["acc"]), "loss": float(res["loss"]), "params_ratio": ratios[0],
                   "flops_ratio": ratios[1], "seconds": seconds}  # fmt: skip
            rows.append(row)
            if on_variant is not None:
                on_variant(pfm, row)
    if several:
        order = list(sources)
        rows.sort(key=lambda r: order.index(r["matching"]))  # stable: depth order within each matching
    return rows


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def save_pfm(pfm: PFMModel, path: str | Path, config: ModelConfig | Mapping[str, Any],
             meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``pfm`` (architecture config, depth, weights of the running modules) atomically."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(dict(config))
    payload = {
        "format": PFM_FORMAT,
        "version": 1,
        "model_config": cfg.to_dict(),
        "preserved": pfm.preserved,
        "transitions": list(pfm.transitions),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in pfm.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return atomic_torch_save(payload, path)


def load_pfm(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[PFMModel, ModelConfig]:
    """Rebuild a PFM system written by :func:`save_pfm` (``weights_only`` load), in eval mode."""
    p = Path(path)
    if not p.is_file():
        raise PFMError(f"PFM checkpoint {str(p)!r} does not exist")
    obj = torch.load(p, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != PFM_FORMAT:
        raise PFMError(f"{str(p)!r} is not a PFM checkpoint (expected format {PFM_FORMAT!r}); "
                       "plain merged models load with vf_lightning.checkpoint.load_model_checkpoint")
    cfg = ModelConfig.from_dict(obj["model_config"])
    skeleton = build_model(cfg).eval()
    example = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    spec = ModelGraph.of(skeleton).spec(example)
    ident = AlignmentResult(method="identity", spec=spec, perms=identity_perms(spec))
    pfm = PreserveFirstMerger(skeleton, copy.deepcopy(skeleton), ident).build(int(obj["preserved"]))
    if pfm.transitions != list(obj.get("transitions", pfm.transitions)):
        raise PFMError(f"{str(p)!r}: the rebuilt transitions {pfm.transitions} differ from the saved "
                       f"{obj['transitions']}; the checkpoint was written by an incompatible version")
    state = obj["state_dict"]
    ensure_biases(pfm, state)
    result = pfm.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise PFMError(f"{str(p)!r}: weights do not fit the rebuilt PFM system (missing {result.missing_keys[:3]}, "
                       f"unexpected {result.unexpected_keys[:3]})")
    return pfm.to(map_location).eval(), cfg
