"""Permutation specs derived by tracing a model with ``torch.fx``.

Every tensor axis that carries features gets an *axis variable*; each op links the variables of the
axes it connects (conv in/out, norm channels, residual additions, flatten, ...). A union-find turns
the links into groups of parameter axes that must share one permutation. Axes linked to the model's
input or output are *fixed* and never permuted. Ops without a handler fail with :class:`UnsupportedOpError`
naming the fx node.

Attention (Transformers) adds structure: a feature axis reshaped into ``heads × head_dim`` becomes a *head-split*
group whose permutations are block-structured (a permutation of whole heads, then one permutation inside each
head); contracting two head-split axes (``q @ kᵀ``) makes them one group, and a batched product over the head
axis (``attn @ v``) ties two groups to one head permutation (:attr:`PermGroup.head_set`). A projection whose
output is split into chunks (a fused ``qkv`` Linear, ``nn.MultiheadAttention``'s ``in_proj_weight``) binds each
chunk of its rows to its own group (:attr:`PermAxis.offset` / ``length``). The fx trace itself (:func:`trace`,
leaves given by :func:`is_leaf_module`) is the package's only one; :class:`vf_lightning.align.graph.ModelGraph`
answers the structural questions over it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from vf_lightning.models.layers import ChannelLayerNorm
from vf_lightning.stats import eval_mode

AFFINE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, _InstanceNorm)

Role = Literal["out", "in"]
SiteKind = Literal["producer", "norm", "act", "pool", "add", "other", "consumer"]


class UnsupportedOpError(RuntimeError):
    """An op of the traced graph cannot be described by the permutation tracer."""


@dataclass(frozen=True)
class PermAxis:
    """Axis ``axis`` of state-dict entry ``key``; channel ``c`` covers indices ``[c*inner, (c+1)*inner)``.

    ``role`` says how a general (non-permutation) transform acts: ``out`` axes carry the group's features
    (producer weight rows, biases, norm parameters and running stats; transformed by the merge matrix),
    ``in`` axes read them (consumer weight columns; transformed by the unmerge matrix).
    """

    key: str
    axis: int
    inner: int = 1
    role: Role = "out"
    kind: SiteKind = "other"
    offset: int = 0  # the group's units cover entries [offset, offset + length) of the axis (length 0: to the end)
    length: int = 0

    def span(self, n: int) -> tuple[int, int]:
        """``(offset, length)`` of the group's entries on an axis of length ``n``."""
        return self.offset, (self.length or n - self.offset)


@dataclass(frozen=True)
class Site:
    """A point of the forward pass whose features live in a group's basis.

    ``module`` is the submodule name, ``call`` the index of its call within one forward (a module can be
    called several times, e.g. torchvision's bottleneck ``relu``), ``port`` whether the features are the
    module's output or its first input, ``kind`` what the module is (``act`` = element-wise activation).
    """

    module: str
    call: int
    port: Literal["out", "in"]
    kind: SiteKind
    node: str
    offset: int = 0  # the features are channels [offset, offset + length) of the tensor (length 0: all)
    length: int = 0


@dataclass(frozen=True)
class PermGroup:
    """One permutation: ``size`` units shared by every axis in ``axes``; ``sites`` are where its features live."""

    name: str
    size: int
    axes: tuple[PermAxis, ...]
    sites: tuple[Site, ...] = ()
    heads: int = 1  # > 1: units are ``heads`` blocks of ``size // heads`` (attention heads), permuted blockwise
    head_set: str = ""  # groups with the same head_set share one permutation of heads (e.g. Q·K and V·O)

    @property
    def head_dim(self) -> int:
        return self.size // self.heads

    @property
    def producers(self) -> list[str]:
        """Conv/linear modules whose output channels form this group (they get ``W ← M W``)."""
        return [_module_of(a.key) for a in self.axes if a.kind == "producer" and a.role == "out"
                and a.key.endswith(".weight")]

    @property
    def consumers(self) -> list[str]:
        """Modules reading this group's features (weight input axes, role ``in``)."""
        return [_module_of(a.key) for a in self.axes if a.role == "in"]

    @property
    def activation_sites(self) -> list[Site]:
        """Sites used by activation matching: post-activation outputs, else consumer inputs, else producers."""
        for kinds, port in ((("act",), "out"), (("consumer",), "in"), (("producer", "norm"), "out")):
            found = [s for s in self.sites if s.kind in kinds and s.port == port]
            if found:
                return found
        return []


@dataclass(frozen=True)
class PermutationSpec:
    """All permutation groups of a model, in graph order, plus the state-dict shapes it was traced on."""

    groups: tuple[PermGroup, ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = field(default=(), repr=False)

    def __iter__(self) -> Iterator[PermGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, name: str) -> PermGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no permutation group {name!r}; groups are {[g.name for g in self.groups]}")

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def axes_of(self, key: str) -> list[tuple[str, PermAxis]]:
        """``(group name, axis)`` pairs that permute state-dict entry ``key``."""
        return [(g.name, a) for g in self.groups for a in g.axes if a.key == key]


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


# ----------------------------------------------------------------------------------------------------------------
# axis variables and union-find

@dataclass(frozen=True)
class _Ax:
    """A tensor dim carrying the features of axis variable ``var``.

    ``part`` is ``all`` (the whole feature axis; each feature a block of ``inner`` entries), or, for an axis
    reshaped into ``heads × head_dim``, ``head`` (the dim indexing heads) or ``within`` (the dim inside a head).
    """

    var: int
    inner: int = 1
    part: Literal["all", "head", "within"] = "all"


@dataclass(frozen=True)
class _Cat:
    """A tensor dim that is the concatenation of several feature axes (the chunks of a fused projection)."""

    parts: tuple[_Ax, ...]
    sizes: tuple[int, ...]


Dim = _Ax | _Cat | None
Desc = tuple[Dim, ...]  # one entry per tensor dim; None = fixed (identity basis)


@dataclass(frozen=True)
class _Stacked:
    """A tensor whose dim ``dim`` indexes differently permuted parts (``qkv`` reshaped to ``3 × …``).

    ``parts[i]`` describes part ``i`` with ``dim`` removed.
    """

    dim: int
    parts: tuple[Desc, ...]


@dataclass(frozen=True)
class _Multi:
    """A tuple of tensors (``unbind``, ``chunk``, ``nn.MultiheadAttention``), one descriptor each."""

    items: tuple[Desc | _Stacked | None, ...]


AnyDesc = Desc | _Stacked | _Multi
FIXED = 0


class _Split(Exception):
    """Raised during a trace: the feature axis rooted at ``root`` must be split into ``chunks`` groups (retrace)."""

    def __init__(self, root: int, chunks: int, where: str) -> None:
        super().__init__(where)
        self.root, self.chunks, self.where = root, chunks, where


def _dim_vars(d: Dim) -> list[int]:
    if d is None:
        return []
    if isinstance(d, _Cat):
        return [p.var for p in d.parts]
    return [d.var]


class _UnionFind:
    """Axis variables: a union-find over shared bases, plus head counts and a second union-find tying head sets."""

    def __init__(self) -> None:
        self.parent = [0]
        self.size: list[int | None] = [None]
        self.heads: list[int | None] = [None]
        self.tie = [0]

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.heads.append(None)
        self.tie.append(len(self.tie))
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def find_tie(self, v: int) -> int:
        """The head set of variable ``v`` (a plain union-find over variables; unions of variables join it too)."""
        while self.tie[v] != v:
            self.tie[v] = self.tie[self.tie[v]]
            v = self.tie[v]
        return v

    def _join_tie(self, a: int, b: int) -> None:
        ta, tb = self.find_tie(a), self.find_tie(b)
        if ta != tb:
            self.tie[tb] = ta

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        sa, sb = self.size[ra], self.size[rb]
        if sa is not None and sb is not None and sa != sb:
            raise UnsupportedOpError(f"{where}: links feature axes of different sizes ({sa} vs {sb})")
        ha, hb = self.heads[ra], self.heads[rb]
        if ha is not None and hb is not None and ha != hb:
            raise UnsupportedOpError(f"{where}: links an axis split into {ha} heads with one split into {hb}")
        self._join_tie(ra, rb)
        if rb == FIXED:  # keep FIXED as root
            ra, rb = rb, ra
        self.parent[rb] = ra
        if self.size[ra] is None and ra != FIXED:
            self.size[ra] = sb
        self.heads[ra] = ha if ha is not None else hb
        return ra

    def tie_heads(self, a: int, b: int, where: str) -> None:
        """Require the head permutations of ``a`` and ``b`` to be one."""
        ra, rb = self.find(a), self.find(b)
        if self.heads[ra] != self.heads[rb]:
            raise UnsupportedOpError(f"{where}: batches over heads of axes split into {self.heads[ra]} and "
                                     f"{self.heads[rb]} heads")
        self._join_tie(ra, rb)

    def set_heads(self, v: int, heads: int, where: str) -> None:
        r = self.find(v)
        if self.heads[r] not in (None, heads):
            raise UnsupportedOpError(f"{where}: splits an axis into {heads} heads that is split into "
                                     f"{self.heads[r]} heads elsewhere")
        self.heads[r] = heads


# ----------------------------------------------------------------------------------------------------------------
# handler registries

ModuleHandler = Callable[["_Ctx", nn.Module], "AnyDesc"]
FuncHandler = Callable[["_Ctx"], "AnyDesc | None"]
MODULE_HANDLERS: dict[type, ModuleHandler] = {}
FUNCTION_HANDLERS: dict[Any, FuncHandler] = {}
METHOD_HANDLERS: dict[str, FuncHandler] = {}
MODULE_KINDS: dict[type, SiteKind] = {}
MULTI_OUTPUT: set[Any] = set()  # function targets / method names whose handlers describe a tuple of tensors


def register_module_handler(*types: type, kind: SiteKind = "other") -> Callable[[ModuleHandler], ModuleHandler]:
    """Register how modules of these types link axes (looked up along the MRO, so subclasses inherit)."""

    def deco(fn: ModuleHandler) -> ModuleHandler:
        for t in types:
            MODULE_HANDLERS[t] = fn
            MODULE_KINDS[t] = kind
        return fn

    return deco


def register_function_handler(*targets: Any, methods: Sequence[str] = (),
                              several: bool = False) -> Callable[[FuncHandler], FuncHandler]:
    """Register a handler for ``call_function`` targets and/or ``call_method`` names (``several``: the op returns
    a tuple of tensors, which the handler describes as a ``_Multi``)."""

    def deco(fn: FuncHandler) -> FuncHandler:
        for t in targets:
            FUNCTION_HANDLERS[t] = fn
        for m in methods:
            METHOD_HANDLERS[m] = fn
        if several:
            MULTI_OUTPUT.update(targets)
            MULTI_OUTPUT.update(methods)
        return fn

    return deco


def _lookup_module(m: nn.Module) -> tuple[ModuleHandler, SiteKind] | None:
    for t in type(m).__mro__:
        if t in MODULE_HANDLERS:
            return MODULE_HANDLERS[t], MODULE_KINDS[t]
    return None


class _Ctx:
    """What a handler sees: the node, real argument values, their descriptors and the real output."""

    def __init__(self, tracer: _SpecTracer, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any],
                 out: Any) -> None:
        self.tracer, self.node, self.args, self.kwargs, self.out = tracer, node, args, kwargs, out

    @property
    def where(self) -> str:
        return self.tracer.describe_node(self.node)

    def fail(self, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.where}: {why}")

    def desc(self, i: int) -> Desc:
        """Descriptor of positional argument ``i`` (must be a tensor produced by the graph)."""
        a = self.node.args[i]
        d = self.tracer.descs.get(a) if isinstance(a, fx.Node) else None
        if isinstance(d, _Stacked):
            raise self.fail(f"argument {i} stacks differently permuted tensors (e.g. q, k, v of a fused projection) "
                            "along one dim; index or unbind that dim first")
        if not isinstance(d, tuple):
            raise self.fail(f"argument {i} is not a traced tensor")
        return d

    def any_desc(self, a: Any) -> AnyDesc | None:
        return self.tracer.descs.get(a) if isinstance(a, fx.Node) else None

    def arg_desc(self, a: Any) -> Desc | None:
        d = self.any_desc(a)
        return d if isinstance(d, tuple) else None

    def link(self, a: Dim, b: Dim) -> Dim:
        """Require two dims to share a basis; returns the surviving descriptor."""
        uf, where = self.tracer.uf, self.where
        if a is None and b is None:
            return None
        if a is None or b is None:
            for var in _dim_vars(a if a is not None else b):
                uf.union(var, FIXED, where)
            return None
        if isinstance(a, _Cat) or isinstance(b, _Cat):
            if not (isinstance(a, _Cat) and isinstance(b, _Cat)) or a.sizes != b.sizes:
                raise self.fail("links a concatenation of feature axes with a differently split axis")
            for pa, pb in zip(a.parts, b.parts):
                self.link(pa, pb)
            return a
        if a.part != b.part:
            raise self.fail(f"links a {a.part!r} feature dim with a {b.part!r} one (heads vs. head dims)")
        if a.inner != b.inner:
            raise self.fail(f"links a feature axis with inner size {a.inner} to one with inner size {b.inner}")
        if a.part == "head":
            uf.tie_heads(a.var, b.var, where)
        else:
            uf.union(a.var, b.var, where)
        return a

    def bind(self, key: str, axis: int, d: Dim, role: Role) -> None:
        if isinstance(d, _Cat):
            offset = 0
            for part, size in zip(d.parts, d.sizes):
                self.tracer.bind(key, axis, part, role, self.where, offset, size)
                offset += size
            return
        if d is not None and d.part != "all":
            raise self.fail(f"a parameter axis of {key!r} reads a {d.part!r} dim of a head-split axis; merge the "
                            "heads back (reshape to heads·head_dim) first")
        self.tracer.bind(key, axis, d, role, self.where)

    def param_axis(self, key: str, axis: int, size: int, role: Role) -> _Ax | _Cat:
        return self.tracer.param_axis(key, axis, size, role, self.where)

    def require_fixed(self, d: Desc, dims: Sequence[int], why: str) -> None:
        uf = self.tracer.uf
        for i in dims:
            if any(uf.find(v) != FIXED for v in _dim_vars(d[i])):
                raise self.fail(f"{why} (dim {i % len(d)} carries permutable features)")

    def plain(self, d: Dim, what: str) -> _Ax | None:
        """``d`` as a whole feature axis (or None); concatenations and head-split dims fail naming ``what``."""
        if isinstance(d, _Cat):
            raise self.fail(f"{what} reads a concatenation of differently permuted feature axes")
        if d is not None and d.part != "all":
            raise self.fail(f"{what} reads the {d.part!r} dim of a head-split axis")
        return d


# ----------------------------------------------------------------------------------------------------------------
# the tracer


class _LeafTracer(fx.Tracer):
    """The package's one fx tracer: keeps :func:`is_leaf_module` modules as leaves (see :func:`trace`)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf_module(m) or super().is_leaf_module(m, module_qualified_name)


BoundKey = tuple[str, int, int]  # (state-dict key, axis, offset of the chunk)


class _SpecTracer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, model: nn.Module, splits: dict[tuple[str, int], int] | None = None) -> None:
        super().__init__(gm)
        self.model = model
        self.uf = _UnionFind()
        self.descs: dict[fx.Node, AnyDesc | None] = {}
        self.bound: dict[BoundKey, tuple[_Ax, Role, SiteKind, int]] = {}  # … → (axis, role, kind, length)
        self.kind: SiteKind = "other"
        self.order: list[BoundKey] = []
        self.sites: list[tuple[int, Site]] = []
        self.calls: dict[str, int] = {}
        self.state_keys = set(model.state_dict().keys())
        self.state_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.splits = dict(splits or {})  # parameter axes whose features come in this many chunks (fused q/k/v)

    def describe_node(self, node: fx.Node) -> str:
        if node.op == "call_module":
            m = self.model.get_submodule(str(node.target))
            return f"fx node {node.name!r} (call_module {node.target!r} of type {type(m).__name__})"
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", node.target)
        mod = getattr(node.target, "__module__", None)
        target_s = f"{mod}.{target}" if mod and not isinstance(node.target, str) else str(target)
        return f"fx node {node.name!r} ({node.op} {target_s})"

    def param_axis(self, key: str, axis: int, size: int, role: Role, where: str,
                   chunks: int | None = None) -> _Ax | _Cat:
        """The feature axis of parameter axis ``(key, axis)``, created on first use (``chunks``: as a concatenation
        of that many equal feature axes, e.g. the q, k, v rows of a fused projection)."""
        chunks = chunks or self.splits.get((key, axis), 1)
        if chunks > 1:
            if size % chunks:
                raise UnsupportedOpError(f"{where}: cannot split axis {axis} of {key!r} ({size}) into {chunks} chunks")
            n = size // chunks
            parts = []
            for c in range(chunks):
                got = self.bound.get((key, axis, c * n))
                if got is None:
                    ax = _Ax(self.uf.new(n))
                    self.bound[(key, axis, c * n)] = (ax, role, self.kind, n)
                    self.order.append((key, axis, c * n))
                    got = (ax, role, self.kind, n)
                parts.append(got[0])
            return _Cat(tuple(parts), (n,) * chunks)
        if (key, axis, 0) in self.bound:
            return self.bound[(key, axis, 0)][0]
        ax = _Ax(self.uf.new(size))
        self.bound[(key, axis, 0)] = (ax, role, self.kind, 0)
        self.order.append((key, axis, 0))
        return ax

    def bind(self, key: str, axis: int, d: _Ax | None, role: Role, where: str, offset: int = 0,
             length: int = 0) -> None:
        if key not in self.state_keys:
            return
        full = self.state_shapes[key][axis]
        if not length and (key, axis) in self.splits:
            raise UnsupportedOpError(f"{where}: axis {axis} of {key!r} is used whole here but as "
                                     f"{self.splits[(key, axis)]} chunks elsewhere")
        n = length or full
        if d is None:
            d = _Ax(FIXED)
        elif self.uf.size[self.uf.find(d.var)] not in (None, n // d.inner) or n % d.inner:
            raise UnsupportedOpError(f"{where}: axis {axis} of {key!r} has length {n}, which does not match "
                                     f"a feature axis of {self.uf.size[self.uf.find(d.var)]}×{d.inner}")
        k = (key, axis, offset)
        if k in self.bound:
            old, _, _, old_len = self.bound[k]
            if old.inner != d.inner or old_len != length:
                raise UnsupportedOpError(f"{where}: {key!r} axis {axis} is used with two different layouts")
            self.uf.union(old.var, d.var, where)
            return
        if any(b[0] == key and b[1] == axis for b in self.bound) and not length:
            raise UnsupportedOpError(f"{where}: {key!r} axis {axis} is used with two different layouts")
        self.bound[k] = (d, role, self.kind, length)
        self.order.append(k)

    def split_root(self, root: int, chunks: int, where: str) -> None:
        """Retrace with every parameter axis of feature axis ``root`` split into ``chunks`` (raises :class:`_Split`)."""
        raise _Split(self.uf.find(root), chunks, where)

    def axes_of_root(self, root: int) -> list[tuple[str, int, int]]:
        """``(key, axis, inner)`` of the whole-axis parameter bindings whose feature axis is rooted at ``root``."""
        return [(k[0], k[1], v[0].inner) for k, v in self.bound.items()
                if self.uf.find(v[0].var) == root and k[2] == 0 and v[3] == 0]

    # -- fx.Interpreter overrides ------------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        try:
            out = getattr(self, n.op)(n.target, args, kwargs)
        except UnsupportedOpError:
            raise
        except Exception as e:  # the real op failed on the example input
            raise UnsupportedOpError(f"{self.describe_node(n)} failed on the example input: {e}") from e
        ctx = _Ctx(self, n, args, kwargs, out)
        self.descs[n] = self._describe(ctx)
        return out

    def _describe(self, ctx: _Ctx) -> AnyDesc | None:
        n, out = ctx.node, ctx.out
        if n.op == "placeholder":
            return tuple(None for _ in range(out.dim())) if isinstance(out, torch.Tensor) else None
        if n.op == "output":
            for a in _flat_nodes(n.args):
                for dim in _all_dims(self.descs.get(a)):
                    ctx.link(dim, None)
            return None
        if n.op == "get_attr":
            if not isinstance(out, torch.Tensor):
                return None
            key = str(n.target)
            if key not in self.state_keys:
                return tuple(None for _ in range(out.dim()))
            return tuple(ctx.param_axis(key, i, s, "out") if s > 1 else None for i, s in enumerate(out.shape))
        if not isinstance(out, torch.Tensor):
            if not _contains_tensor(out):
                if n.op == "call_module" or not _shape_query(n):
                    raise ctx.fail("returns a non-tensor value that is not a shape query")
                return None
            several = (n.op == "call_module" or (n.op == "call_function" and n.target in MULTI_OUTPUT)
                       or (n.op == "call_method" and str(n.target) in MULTI_OUTPUT))
            if not several:
                raise ctx.fail("returns several tensors; no handler describes how their axes map")
        if n.op == "call_module":
            name = str(n.target)
            m = self.model.get_submodule(name)
            found = _lookup_module(m)
            if found is None:
                raise ctx.fail("has no permutation handler; register one with "
                               "vf_lightning.align.spec.register_module_handler or make it traceable")
            handler, kind = found
            self.kind = kind
            try:
                desc = handler(ctx, m)
            finally:
                self.kind = "other"
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            if isinstance(desc, tuple):
                self._record_sites(ctx, name, call, kind, desc)
            return desc
        if n.op in ("call_function", "call_method") and self._reads_only_fixed(n):
            return _fixed_like(out)  # no permutable feature flows in, so none flows out
        if n.op == "call_function":
            fh = FUNCTION_HANDLERS.get(n.target)
            if fh is None:
                raise ctx.fail("has no permutation handler; register one with "
                               "vf_lightning.align.spec.register_function_handler")
            return fh(ctx)
        if n.op == "call_method":
            mh = METHOD_HANDLERS.get(str(n.target))
            if mh is None:
                raise ctx.fail("has no permutation handler; register one with "
                               "vf_lightning.align.spec.register_function_handler(methods=[...])")
            return mh(ctx)
        raise ctx.fail(f"unknown fx op {n.op!r}")

    def _reads_only_fixed(self, n: fx.Node) -> bool:
        """Whether every tensor ``n`` reads carries only fixed axes (e.g. ``F.unfold`` of the model input)."""
        for a in _flat_nodes((n.args, n.kwargs)):
            d = self.descs.get(a)
            if isinstance(d, (_Stacked, _Multi)):
                return False
            if isinstance(d, tuple) and any(self.uf.find(v) != FIXED for dim in d for v in _dim_vars(dim)):
                return False
        return True

    def _record_sites(self, ctx: _Ctx, name: str, call: int, kind: SiteKind, desc: Desc) -> None:
        for var, off, length in _site_axes(desc):
            self.sites.append((var, Site(name, call, "out", kind, ctx.node.name, off, length)))
        if kind == "producer" and ctx.node.args and isinstance(ctx.node.args[0], fx.Node):
            in_desc = self.descs.get(ctx.node.args[0])
            if isinstance(in_desc, tuple):
                for var, off, length in _site_axes(in_desc):
                    self.sites.append((var, Site(name, call, "in", "consumer", ctx.node.name, off, length)))

    def build(self) -> PermutationSpec:
        uf = self.uf
        members: dict[int, list[PermAxis]] = {}
        first: dict[int, int] = {}
        for i, k in enumerate(self.order):
            key, axis, offset = k
            ax, role, kind, length = self.bound[k]
            r = uf.find(ax.var)
            if r == FIXED:
                continue
            members.setdefault(r, []).append(PermAxis(key, axis, ax.inner, role, kind, offset, length))
            first.setdefault(r, i)
        sites: dict[int, list[Site]] = {}
        for v, s in self.sites:
            r = uf.find(v)
            if r in members and s not in sites.setdefault(r, []):
                sites[r].append(s)
        names: dict[int, str] = {}
        used: set[str] = set()
        roots = [r for r in sorted(members, key=lambda r: first[r]) if (uf.size[r] or 0) > 1]
        for r in roots:
            axes = members[r]
            outs = [a for a in axes if a.role == "out"] or axes
            name = _module_of(outs[0].key) or outs[0].key
            if outs[0].length:
                name += f"[{outs[0].offset}:{outs[0].offset + outs[0].length}]"
            while name in used:
                name = name + "'"
            used.add(name)
            names[r] = name
        tie_names: dict[int, str] = {}
        for r in roots:
            if uf.heads[r] and uf.heads[r] > 1:  # type: ignore[operator]
                t = uf.find_tie(r)
                if t == uf.find_tie(FIXED):
                    raise UnsupportedOpError(f"the attention heads of {names[r]!r} are tied to fixed features")
                tie_names.setdefault(t, names[r])
        groups = []
        for r in roots:
            size = uf.size[r]
            assert size is not None
            heads = uf.heads[r] or 1
            head_set = tie_names[uf.find_tie(r)] if heads > 1 else ""
            groups.append(PermGroup(names[r], size, tuple(members[r]), tuple(sites.get(r, ())), heads, head_set))
        return PermutationSpec(tuple(groups), tuple(self.state_shapes.items()))


def _fixed_like(out: Any) -> AnyDesc | None:
    """All-fixed descriptors for a tensor or a tuple of tensors."""
    if isinstance(out, torch.Tensor):
        return tuple(None for _ in range(out.dim()))
    if isinstance(out, (list, tuple)):
        return _Multi(tuple(_fixed_like(o) for o in out))  # type: ignore[misc]
    return None


def _all_dims(d: AnyDesc | None) -> Iterator[Dim]:
    if isinstance(d, tuple):
        yield from d
    elif isinstance(d, _Stacked):
        for p in d.parts:
            yield from p
    elif isinstance(d, _Multi):
        for item in d.items:
            yield from _all_dims(item)


def _site_axes(desc: Desc) -> list[tuple[int, int, int]]:
    """``(var, offset, length)`` of the channel axis of an ``N×C``/``N×C×H×W`` (dim 1) or ``N×L×C`` (last dim)
    output when it is the only permuted dim (one per chunk of a concatenation)."""
    if len(desc) in (2, 4):
        ch = 1
    elif len(desc) == 3:
        ch = 2
    else:
        return []
    ax = desc[ch]
    if ax is None or any(d is not None for i, d in enumerate(desc) if i != ch):
        return []
    if isinstance(ax, _Cat):
        offs = [sum(ax.sizes[:i]) for i in range(len(ax.sizes))]
        return [(p.var, o, n) for p, o, n in zip(ax.parts, offs, ax.sizes)]
    if ax.inner != 1 or ax.part != "all":
        return []
    return [(ax.var, 0, 0)]


def _flat_nodes(a: Any) -> Iterator[fx.Node]:
    if isinstance(a, fx.Node):
        yield a
    elif isinstance(a, (list, tuple)):
        for x in a:
            yield from _flat_nodes(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _flat_nodes(x)


def _contains_tensor(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (list, tuple)):
        return any(_contains_tensor(y) for y in x)
    if isinstance(x, dict):
        return any(_contains_tensor(y) for y in x.values())
    return False


_SHAPE_METHODS = {"size", "dim", "numel", "ndimension"}
_SHAPE_FUNCS = {getattr, operator.getitem, operator.mul, operator.add, operator.floordiv, operator.sub, len}


def _shape_query(n: fx.Node) -> bool:
    if n.op == "call_method":
        return str(n.target) in _SHAPE_METHODS
    return n.op == "call_function" and n.target in _SHAPE_FUNCS


# ----------------------------------------------------------------------------------------------------------------
# module handlers


def _bind_weight(ctx: _Ctx, m: nn.Module, in_ax: Dim) -> _Ax | _Cat:
    """Bind a conv/linear weight: axis 1 reads ``in_ax``, axis 0 (and the bias) create the output axis."""
    name = str(ctx.node.target)
    w = m.weight
    assert isinstance(w, torch.Tensor)
    ctx.bind(f"{name}.weight", 1, in_ax, "in")
    out_ax = ctx.param_axis(f"{name}.weight", 0, w.shape[0], "out")
    if isinstance(getattr(m, "bias", None), torch.Tensor):
        ctx.bind(f"{name}.bias", 0, out_ax, "out")
    return out_ax


@register_module_handler(nn.Conv1d, nn.Conv2d, nn.Conv3d, kind="producer")
def _conv(ctx: _Ctx, m: nn.Module) -> Desc:
    d = ctx.desc(0)
    if isinstance(d[1], _Ax) and d[1].inner != 1:
        raise ctx.fail("convolution input channels carry flattened features")
    if m.groups != 1:  # type: ignore[union-attr]
        raise ctx.fail(f"grouped convolutions (groups={m.groups}) are not supported")
    ctx.require_fixed(d, [0] + list(range(2, len(d))), "convolution over permuted batch/spatial axes")
    out_ax = _bind_weight(ctx, m, d[1])
    return (None, out_ax) + tuple(None for _ in range(len(d) - 2))


@register_module_handler(nn.Linear, kind="producer")
def _linear(ctx: _Ctx, m: nn.Module) -> Desc:
    d = ctx.desc(0)
    ctx.require_fixed(d, range(len(d) - 1), "linear layer applied to a tensor with permuted leading axes")
    out_ax = _bind_weight(ctx, m, d[-1])
    return tuple(None for _ in range(len(d) - 1)) + (out_ax,)


def _bind_channel_params(ctx: _Ctx, m: nn.Module, ax: Dim, names: Sequence[str]) -> None:
    if isinstance(ax, _Ax) and ax.inner != 1:
        raise ctx.fail("normalization over flattened features")
    prefix = str(ctx.node.target)
    for p in names:
        t = getattr(m, p, None)
        if isinstance(t, torch.Tensor):
            ctx.bind(f"{prefix}.{p}", 0, ax, "out")


@register_module_handler(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, kind="norm")
def _batchnorm(ctx: _Ctx, m: nn.Module) -> Desc:
    d = ctx.desc(0)
    _bind_channel_params(ctx, m, d[1], ("weight", "bias", "running_mean", "running_var"))
    return d


@register_module_handler(ChannelLayerNorm, kind="norm")
def _channel_layernorm(ctx: _Ctx, m: nn.Module) -> Desc:
    d = ctx.desc(0)
    _bind_channel_params(ctx, m, d[1], ("weight", "bias"))
    return d


@register_module_handler(nn.LayerNorm, kind="norm")
def _layernorm(ctx: _Ctx, m: nn.Module) -> Desc:
    d = ctx.desc(0)
    shape: tuple[int, ...] = tuple(m.normalized_shape)  # type: ignore[arg-type]
    if len(shape) != 1:
        ctx.require_fixed(d, range(len(d) - len(shape), len(d)), "LayerNorm over several permuted axes")
        return d
    _bind_channel_params(ctx, m, d[-1], ("weight", "bias"))
    return d


_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Mish, nn.Softsign, nn.Tanhshrink,
)


def _same(ctx: _Ctx, m: nn.Module | None = None) -> Desc:
    return ctx.desc(0)


register_module_handler(*_ELEMENTWISE_MODULES, kind="act")(_same)
register_module_handler(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, kind="other")(_same)
register_module_handler(nn.Softmax, nn.LogSoftmax, kind="other")(_same)


def _pool_dims(ctx: _Ctx, spatial: int) -> Desc:
    d = ctx.desc(0)
    ctx.require_fixed(d, range(len(d) - spatial, len(d)), "pooling over a permuted axis")
    return d[: len(d) - spatial] + tuple(None for _ in range(ctx.out.dim() - len(d) + spatial))


def _pool_handler(spatial: int) -> ModuleHandler:
    return lambda ctx, m: _pool_dims(ctx, spatial)


register_module_handler(nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, kind="pool")(
    _pool_handler(1))
register_module_handler(nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, kind="pool")(
    _pool_handler(2))
register_module_handler(nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, kind="pool")(
    _pool_handler(3))


# ----------------------------------------------------------------------------------------------------------------
# function / method handlers

register_function_handler(
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardtanh, F.hardswish, F.mish, F.softplus,
    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, torch.relu_, F.relu_, operator.neg, torch.neg,
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.abs, torch.exp, torch.sqrt,
    methods=("relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "double", "half",
             "to", "type_as", "neg", "abs", "exp", "sqrt", "softmax", "log_softmax", "sigmoid_", "tanh_", "clamp",
             "clamp_", "clamp_min", "clamp_min_"),
)(lambda ctx: ctx.desc(0))
register_function_handler(torch.clamp, torch.clamp_min)(lambda ctx: ctx.desc(0))


@register_function_handler(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    methods=("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"),
)
def _binary(ctx: _Ctx) -> Desc:
    out = ctx.out
    nd = out.dim()
    result: list[Dim] = [None] * nd
    seen = [False] * nd
    for a, v in zip(ctx.node.args, ctx.args):
        if not isinstance(v, torch.Tensor):
            continue
        d = ctx.arg_desc(a) or tuple(None for _ in range(v.dim()))
        off = nd - v.dim()
        for i in range(v.dim()):
            j = off + i
            if out.shape[j] == 1 or v.shape[i] != out.shape[j]:
                continue  # broadcast: no constraint
            result[j] = ctx.link(result[j], d[i]) if seen[j] else d[i]
            seen[j] = True
    return tuple(result)


@register_function_handler(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                           methods=("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                                    "view_as", "reshape_as"))
def _reshape(ctx: _Ctx) -> Desc | _Stacked:
    return _reshape_desc(ctx, ctx.desc(0), tuple(ctx.args[0].shape), tuple(ctx.out.shape))


register_module_handler(nn.Flatten, nn.Unflatten, kind="other")(
    lambda ctx, m: _reshape_desc(ctx, ctx.desc(0), tuple(ctx.args[0].shape), tuple(ctx.out.shape)))


def _reshape_desc(ctx: _Ctx, d: Desc, s_in: tuple[int, ...], s_out: tuple[int, ...]) -> Desc | _Stacked:
    """Map feature axes through a contiguous reshape.

    A whole feature axis may stay the leading factor of one dim (flatten / unflatten with ``inner`` blocks); split
    into two dims it becomes ``heads × head_dim``; split into three (``3 × heads × head_dim``) its parameter axes are
    chunked and the model retraced; a concatenation split by its number of chunks becomes a :class:`_Stacked`.
    """
    structured = any(isinstance(x, _Cat) or (isinstance(x, _Ax) and x.part != "all") for x in d)
    if not structured:
        try:
            return _reshape_plain(ctx, d, s_in, s_out)
        except UnsupportedOpError as e:
            return _reshape_structured(ctx, d, s_in, s_out, str(e))
    return _reshape_structured(ctx, d, s_in, s_out, f"reshape {s_in} -> {s_out} splits or mixes a head-split axis")


def _reshape_plain(ctx: _Ctx, d: Desc, s_in: tuple[int, ...], s_out: tuple[int, ...]) -> Desc:
    out: list[Dim] = [None] * len(s_out)
    for k, ax in enumerate(d):
        if ax is None:
            continue
        assert isinstance(ax, _Ax)
        c = s_in[k] // ax.inner
        stride = ax.inner * math.prod(s_in[k + 1:])  # flat-index stride of one channel step
        target = None
        for j in range(len(s_out)):
            t_j = math.prod(s_out[j + 1:])
            if stride % t_j == 0 and s_out[j] * t_j == c * stride:
                target = j
                break
        if target is None or out[target] is not None:
            raise ctx.fail(f"reshape {s_in} -> {s_out} splits or mixes the permutable axis {k}")
        out[target] = _Ax(ax.var, stride // math.prod(s_out[target + 1:]))
    return tuple(out)


def _reshape_groups(s_in: tuple[int, ...], s_out: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Minimal runs of input and output dims with equal products (how a contiguous reshape regroups dims)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(s_in) or j < len(s_out):
        ins: list[int] = []
        outs: list[int] = []
        pi = pj = 1
        if i < len(s_in):
            ins.append(i)
            pi *= s_in[i]
            i += 1
        if j < len(s_out):
            outs.append(j)
            pj *= s_out[j]
            j += 1
        while pi != pj and (i < len(s_in) or j < len(s_out)):
            if (pi < pj and i < len(s_in)) or j >= len(s_out):
                ins.append(i)
                pi *= s_in[i]
                i += 1
            else:
                outs.append(j)
                pj *= s_out[j]
                j += 1
        groups.append((ins, outs))
    return groups


def _head_split(ctx: _Ctx, var: int, heads: int) -> tuple[_Ax, _Ax]:
    ctx.tracer.uf.set_heads(var, heads, ctx.where)
    return _Ax(var, 1, "head"), _Ax(var, 1, "within")


def _reshape_structured(ctx: _Ctx, d: Desc, s_in: tuple[int, ...], s_out: tuple[int, ...], why: str) -> Desc | _Stacked:
    uf = ctx.tracer.uf
    out: list[Dim] = [None] * len(s_out)
    stack: tuple[int, list[tuple[list[int], tuple[Dim, ...]]]] | None = None
    for ins, outs in _reshape_groups(s_in, s_out):
        big_in = [k for k in ins if s_in[k] > 1 and d[k] is not None]
        if not big_in:
            continue
        big_out = [j for j in outs if s_out[j] > 1]
        first = d[big_in[0]]
        if len(ins) - sum(s_in[k] == 1 for k in ins) == 1 and len(big_out) == 1:
            out[big_out[0]] = first  # the dim passes through unchanged
        elif len(big_in) == 1 and isinstance(first, _Ax) and first.part == "all" and first.inner == 1 \
                and all(s_in[k] == 1 for k in ins if k != big_in[0]):
            if len(big_out) == 2:
                out[big_out[0]], out[big_out[1]] = _head_split(ctx, first.var, s_out[big_out[0]])
            elif len(big_out) >= 3:
                ctx.tracer.split_root(first.var, s_out[big_out[0]], ctx.where)
            else:
                raise ctx.fail(why)
        elif len(big_in) == 1 and isinstance(first, _Cat) and len(big_out) in (2, 3) \
                and s_out[big_out[0]] == len(first.parts) and len(set(first.sizes)) == 1:
            if stack is not None:
                raise ctx.fail(why)
            rest = big_out[1:]
            per_part = []
            for p in first.parts:
                per_part.append((p,) if len(rest) == 1 else _head_split(ctx, p.var, s_out[rest[0]]))
            stack = (big_out[0], [(rest, dims) for dims in per_part])
        elif len(big_in) == 2 and len(big_out) == 1 and all(isinstance(d[k], _Ax) for k in big_in):
            h, w = d[big_in[0]], d[big_in[1]]
            assert isinstance(h, _Ax) and isinstance(w, _Ax)
            if h.part != "head" or w.part != "within" or uf.find_tie(h.var) != uf.find_tie(w.var):
                raise ctx.fail(why)
            out[big_out[0]] = _Ax(w.var)  # heads merged back: the within axis's group (its heads are tied)
        else:
            raise ctx.fail(why)
    if stack is None:
        return tuple(out)
    sdim, parts = stack
    descs = []
    for rest, dims in parts:
        full = list(out)
        for j, dm in zip(rest, dims):
            full[j] = dm
        descs.append(tuple(full[:sdim] + full[sdim + 1:]))
    return _Stacked(sdim, tuple(descs))


def _moved_order(ctx: _Ctx, ndim: int) -> list[int]:
    """For an axis permutation op, the source dim of each output dim."""
    sizes = [2 + i for i in range(ndim)]
    dummy = torch.empty(sizes)
    if ctx.node.op == "call_method":
        moved = getattr(dummy, str(ctx.node.target))(*ctx.args[1:], **ctx.kwargs)
    else:
        moved = ctx.node.target(dummy, *ctx.args[1:], **ctx.kwargs)  # type: ignore[operator]
    return [sizes.index(s) for s in moved.shape]


@register_function_handler(torch.transpose, torch.permute, torch.movedim, torch.swapaxes,
                           methods=("transpose", "permute", "movedim", "swapaxes", "t"))
def _axis_permute(ctx: _Ctx) -> Desc | _Stacked:
    src = ctx.any_desc(ctx.node.args[0])
    order = _moved_order(ctx, ctx.args[0].dim())
    if isinstance(src, _Stacked):
        new_dim = order.index(src.dim)
        parts = []
        for p in src.parts:
            full = list(p[:src.dim]) + [None] + list(p[src.dim:])
            moved = [full[k] for k in order]
            parts.append(tuple(moved[:new_dim] + moved[new_dim + 1:]))
        return _Stacked(new_dim, tuple(parts))
    d = ctx.desc(0)
    return tuple(d[k] for k in order)


@register_function_handler(methods=("expand", "expand_as"))
def _expand(ctx: _Ctx) -> Desc:
    d = ctx.desc(0)
    x, out = ctx.args[0], ctx.out
    off = out.dim() - x.dim()
    return tuple(d[j - off] if j >= off and x.shape[j - off] == out.shape[j] else None for j in range(out.dim()))


def _index_items(idx: Any, ndim: int) -> list[Any]:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(i is Ellipsis for i in items):
        at = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:at] + [slice(None)] * (ndim - used) + items[at + 1:]
    return items + [slice(None)] * (ndim - sum(1 for i in items if i is not None))


@register_function_handler(operator.getitem)
def _getitem(ctx: _Ctx) -> AnyDesc | None:
    src = ctx.any_desc(ctx.node.args[0])
    idx = ctx.args[1]
    if isinstance(src, _Multi):
        return src.items[idx] if isinstance(idx, int) else _Multi(tuple(src.items[idx]))
    x = ctx.args[0]
    if not isinstance(x, torch.Tensor):
        raise ctx.fail("indexes a value the tracer cannot describe")
    items = _index_items(idx, x.dim())
    if isinstance(src, _Stacked):
        picks = [k for k, it in enumerate(i for i in items if i is not None) if not isinstance(it, slice)]
        if picks != [src.dim] or not isinstance(items[src.dim], int) or any(i is None for i in items):
            raise ctx.fail("indexes a stack of differently permuted tensors other than by one integer on its stack dim")
        part = src.parts[items[src.dim]]
        rest = [i for k, i in enumerate(items) if k != src.dim]
        return _index_desc(ctx, part, rest, tuple(s for k, s in enumerate(x.shape) if k != src.dim))
    return _index_desc(ctx, ctx.desc(0), items, tuple(x.shape))


def _index_desc(ctx: _Ctx, d: Desc, items: list[Any], shape: tuple[int, ...]) -> Desc:
    out: list[Dim] = []
    k = 0
    for it in items:
        if it is None:
            out.append(None)
            continue
        if isinstance(it, slice):
            if it == slice(None) or range(shape[k])[it] == range(shape[k]):
                out.append(d[k])
            else:
                ctx.require_fixed(d, [k], "slicing a permutable axis")
                out.append(None)
        elif isinstance(it, int):
            ctx.require_fixed(d, [k], "indexing into a permutable axis")
        else:
            raise ctx.fail("advanced (tensor) indexing is not supported by the permutation tracer")
        k += 1
    return tuple(out)


def _split_pieces(ctx: _Ctx, d: Desc, dim: int, sizes: list[int]) -> _Multi:
    """Descriptors of the pieces of ``d`` cut along ``dim`` into ``sizes`` (chunk / split / unbind)."""
    ax = d[dim]
    if ax is None or all(ctx.tracer.uf.find(v) == FIXED for v in _dim_vars(ax)):
        return _Multi(tuple(d for _ in sizes))
    if isinstance(ax, _Cat) and list(ax.sizes) == sizes:
        return _Multi(tuple(d[:dim] + (p,) + d[dim + 1:] for p in ax.parts))
    if isinstance(ax, _Ax) and ax.part == "all" and ax.inner == 1 and len(set(sizes)) == 1:
        ctx.tracer.split_root(ax.var, len(sizes), ctx.where)
    raise ctx.fail(f"cuts the permutable axis {dim} into pieces {sizes} that no projection's output is made of")


@register_function_handler(torch.chunk, torch.split, torch.tensor_split, methods=("chunk", "split", "tensor_split"),
                           several=True)
def _chunk(ctx: _Ctx) -> _Multi:
    d = ctx.desc(0)
    x = ctx.args[0]
    dim = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("dim", 0)
    dim %= x.dim()
    return _split_pieces(ctx, d, dim, [t.shape[dim] for t in ctx.out])


@register_function_handler(torch.unbind, methods=("unbind",), several=True)
def _unbind(ctx: _Ctx) -> _Multi:
    src = ctx.any_desc(ctx.node.args[0])
    x = ctx.args[0]
    dim = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim", 0)
    dim %= x.dim()
    if isinstance(src, _Stacked):
        if dim != src.dim:
            raise ctx.fail("unbinds a stack of differently permuted tensors along another dim than its stack dim")
        return _Multi(src.parts)
    d = ctx.desc(0)
    ax = d[dim]
    if isinstance(ax, _Ax) and ax.part == "head":  # (…, chunks, features) split as heads: chunk the axis instead
        ctx.tracer.split_root(ax.var, x.shape[dim], ctx.where)
    ctx.require_fixed(d, [dim], "unbinding a permutable axis")
    rest = d[:dim] + d[dim + 1:]
    return _Multi(tuple(rest for _ in range(x.shape[dim])))


@register_function_handler(operator.matmul, torch.matmul, torch.bmm, methods=("matmul", "bmm"))
def _matmul(ctx: _Ctx) -> Desc:
    a, b = ctx.desc(0), ctx.desc(1)
    if len(a) < 2 or len(b) < 2:
        raise ctx.fail("matrix products with a 1-D operand are not supported")
    ctx.link(a[-1], b[-2])  # the contracted dim: one basis on both sides
    return _batch_dims(ctx, [a[:-2], b[:-2]], ctx.out.dim() - 2, [ctx.args[0].shape[:-2], ctx.args[1].shape[:-2]],
                       ctx.out.shape[:-2]) + (a[-2], b[-1])


def _batch_dims(ctx: _Ctx, descs: list[Desc], nd: int, shapes: list[Any], out_shape: Any) -> Desc:
    """Broadcast batch dims of several operands, linked where they have the output's size.

    The last operand's descriptor describes the output dim (``attn @ v``: the heads of v, which the merge of heads
    and head dims after it reads together with v's head dims).
    """
    result: list[Dim] = [None] * nd
    seen = [False] * nd
    for d, shape in zip(descs, shapes):
        off = nd - len(d)
        for i in range(len(d)):
            j = off + i
            if out_shape[j] == 1 or shape[i] != out_shape[j]:
                continue
            if seen[j]:
                ctx.link(result[j], d[i])
            result[j] = d[i]
            seen[j] = True
    return tuple(result)


@register_function_handler(F.scaled_dot_product_attention)
def _sdpa(ctx: _Ctx) -> Desc:
    q, k, v = ctx.desc(0), ctx.desc(1), ctx.desc(2)
    mask = ctx.node.kwargs.get("attn_mask", ctx.node.args[3] if len(ctx.node.args) > 3 else None)
    md = ctx.arg_desc(mask)
    if md is not None:
        ctx.require_fixed(md, range(len(md)), "an attention mask over permuted axes")
    ctx.link(q[-1], k[-1])  # q · k over head dims
    ctx.link(k[-2], v[-2])  # keys and values share their token axis
    nd = ctx.out.dim() - 2
    shapes = [t.shape[:-2] for t in ctx.args[:3]]
    batch = _batch_dims(ctx, [q[:-2], k[:-2], v[:-2]], nd, shapes, ctx.out.shape[:-2])
    return batch + (q[-2], v[-1])


@register_function_handler(torch.mean, torch.sum, torch.amax, methods=("mean", "sum", "amax"))
def _reduce(ctx: _Ctx) -> Desc:
    d = ctx.desc(0)
    x = ctx.args[0]
    dims = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim")
    if dims is None:
        return ()
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = {i % x.dim() for i in dims}
    keep = ctx.out.dim() == x.dim()
    return tuple(None if i in dims else a for i, a in enumerate(d) if keep or i not in dims)


@register_function_handler(torch.cat, torch.concat)
def _cat(ctx: _Ctx) -> Desc:
    tensors = ctx.node.args[0]
    dim = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim", 0)
    nd = ctx.out.dim()
    dim %= nd
    result: list[Dim] = [None] * nd
    assert isinstance(tensors, (list, tuple))
    for n, a in enumerate(tensors):
        d = ctx.arg_desc(a)
        if d is None:
            d = tuple(None for _ in range(nd))
        ctx.require_fixed(d, [dim], "concatenation along a permutable axis")
        for i in range(nd):
            if i != dim:
                result[i] = ctx.link(result[i], d[i]) if n else d[i]
    return tuple(result)


@register_function_handler(F.layer_norm)
def _f_layer_norm(ctx: _Ctx) -> Desc:
    d = ctx.desc(0)
    shape = ctx.args[1]
    if len(shape) != 1:
        ctx.require_fixed(d, range(len(d) - len(shape), len(d)), "layer_norm over several permuted axes")
        return d
    for a in list(ctx.node.args[2:4]) + [ctx.node.kwargs.get("weight"), ctx.node.kwargs.get("bias")]:
        pd = ctx.arg_desc(a)
        if pd:
            ctx.link(d[-1], pd[0])
    return d


def _pool_func(spatial: int) -> FuncHandler:
    return lambda ctx: _pool_dims(ctx, spatial)


register_function_handler(F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                          torch.max_pool2d, torch._C._nn.avg_pool2d)(_pool_func(2))
register_function_handler(F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d)(_pool_func(1))


@register_module_handler(nn.MultiheadAttention, kind="other")
def _multihead_attention(ctx: _Ctx, m: nn.Module) -> _Multi:
    """``nn.MultiheadAttention`` as one leaf: q, k, v chunks of ``in_proj_weight`` rows, heads, ``out_proj``."""
    assert isinstance(m, nn.MultiheadAttention)
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise ctx.fail("nn.MultiheadAttention with kdim/vdim, bias_k/bias_v or add_zero_attn is not supported")
    name = str(ctx.node.target)
    descs = [ctx.desc(i) for i in range(3)]
    for d in descs:
        ctx.require_fixed(d, range(len(d) - 1), "attention over permuted batch / token axes")
    feat = ctx.link(ctx.link(descs[0][-1], descs[1][-1]), descs[2][-1])  # one in_proj reads query, key and value
    ctx.bind(f"{name}.in_proj_weight", 1, ctx.plain(feat, "nn.MultiheadAttention"), "in")
    cat = ctx.tracer.param_axis(f"{name}.in_proj_weight", 0, 3 * m.embed_dim, "out", ctx.where, chunks=3)
    assert isinstance(cat, _Cat)
    ctx.bind(f"{name}.in_proj_bias", 0, cat, "out")
    uf = ctx.tracer.uf
    q, k, v = (p.var for p in cat.parts)
    for var in (q, k, v):
        uf.set_heads(var, m.num_heads, ctx.where)
    uf.union(q, k, ctx.where)  # q · k: one permutation inside and across heads
    uf.tie_heads(q, v, ctx.where)  # the weights of head h average the values of head h
    ctx.bind(f"{name}.out_proj.weight", 1, _Ax(v), "in")
    out = ctx.param_axis(f"{name}.out_proj.weight", 0, m.embed_dim, "out")
    ctx.bind(f"{name}.out_proj.bias", 0, out, "out")
    nd = ctx.out[0].dim()
    weights = ctx.out[1]
    return _Multi(((None,) * (nd - 1) + (out,), None if weights is None else (None,) * weights.dim()))


# ----------------------------------------------------------------------------------------------------------------
# public entry


def is_leaf_module(m: nn.Module) -> bool:
    """Modules the trace keeps whole: those with a permutation handler, and every Conv/Linear/norm layer."""
    return _lookup_module(m) is not None or isinstance(m, AFFINE_TYPES + NORM_TYPES)


def trace(model: nn.Module) -> fx.GraphModule:
    """The one fx trace of ``model`` (leaves: :func:`is_leaf_module`); use it through
    :func:`vf_lightning.align.graph.trace` / :class:`~vf_lightning.align.graph.ModelGraph`."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:  # tracing failures come in many types
        raise UnsupportedOpError(
            f"torch.fx cannot trace {type(model).__name__}: {e}. Make its forward traceable (no data-dependent "
            "control flow) or register a module handler for the offending submodule") from e
    return fx.GraphModule(model, graph)


@torch.no_grad()
def build_permutation_spec(model: nn.Module, example_input: torch.Tensor,
                           graph: fx.GraphModule | None = None) -> PermutationSpec:
    """The groups of axes of ``model`` that share one permutation, found by running its trace on ``example_input``.

    ``graph`` is a trace of ``model`` to reuse (:attr:`ModelGraph.gm <vf_lightning.align.graph.ModelGraph>`);
    without it the model is traced here.
    """
    gm = graph if graph is not None else trace(model)
    splits: dict[tuple[str, int], int] = {}
    with eval_mode(model):
        for _ in range(64):  # each retrace chunks one more fused projection (q / k / v)
            tracer = _SpecTracer(gm, model, splits)
            try:
                tracer.run(example_input)
            except _Split as sp:
                axes = tracer.axes_of_root(sp.root)
                if not axes or any(inner != 1 for _, _, inner in axes) or any(k in splits for k, _, _ in axes):
                    raise UnsupportedOpError(f"{sp.where}: cuts a feature axis into {sp.chunks} chunks, but it is "
                                             "not the output of one projection") from None
                splits.update({(key, axis): sp.chunks for key, axis, _ in axes})
                continue
            return tracer.build()
        raise UnsupportedOpError("too many fused projections to chunk")
