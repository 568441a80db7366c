"""Permutation specs derived by tracing a model with ``torch.fx``.

Every tensor axis that carries features gets an *axis variable*; each op links the variables of the
axes it connects (conv in/out, norm channels, residual additions, flatten, ...). A union-find turns
the links into groups of parameter axes that must share one permutation. Axes linked to the model's
input or output are *fixed* and never permuted. Ops without a handler fail with :class:`UnsupportedOpError`
naming the fx node. The fx trace itself (:func:`trace`, leaves given by :func:`is_leaf_module`) is the
package's only one; :class:`vf_lightning.align.graph.ModelGraph` answers the structural questions over it.
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


@dataclass(frozen=True)
class PermGroup:
    """One permutation: ``size`` units shared by every axis in ``axes``; ``sites`` are where its features live."""

    name: str
    size: int
    axes: tuple[PermAxis, ...]
    sites: tuple[Site, ...] = ()

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
    var: int
    inner: int = 1


Desc = tuple[_Ax | None, ...]  # one entry per tensor dim; None = fixed (identity basis)
FIXED = 0


class _UnionFind:
    def __init__(self) -> None:
        self.parent = [0]
        self.size: list[int | None] = [None]

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        sa, sb = self.size[ra], self.size[rb]
        if sa is not None and sb is not None and sa != sb:
            raise UnsupportedOpError(f"{where}: links feature axes of different sizes ({sa} vs {sb})")
        if rb == FIXED:  # keep FIXED as root
            ra, rb = rb, ra
        self.parent[rb] = ra
        if self.size[ra] is None and ra != FIXED:
            self.size[ra] = sb
        return ra


# ----------------------------------------------------------------------------------------------------------------
# handler registries

ModuleHandler = Callable[["_Ctx", nn.Module], Desc]
FuncHandler = Callable[["_Ctx"], Desc]
MODULE_HANDLERS: dict[type, ModuleHandler] = {}
FUNCTION_HANDLERS: dict[Any, FuncHandler] = {}
METHOD_HANDLERS: dict[str, FuncHandler] = {}
MODULE_KINDS: dict[type, SiteKind] = {}


def register_module_handler(*types: type, kind: SiteKind = "other") -> Callable[[ModuleHandler], ModuleHandler]:
    """Register how modules of these types link axes (looked up along the MRO, so subclasses inherit)."""

    def deco(fn: ModuleHandler) -> ModuleHandler:
        for t in types:
            MODULE_HANDLERS[t] = fn
            MODULE_KINDS[t] = kind
        return fn

    return deco


def register_function_handler(*targets: Any, methods: Sequence[str] = ()) -> Callable[[FuncHandler], FuncHandler]:
    """Register a handler for ``call_function`` targets and/or ``call_method`` names."""

    def deco(fn: FuncHandler) -> FuncHandler:
        for t in targets:
            FUNCTION_HANDLERS[t] = fn
        for m in methods:
            METHOD_HANDLERS[m] = fn
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
        if not isinstance(a, fx.Node) or not isinstance(self.tracer.descs.get(a), tuple):
            raise self.fail(f"argument {i} is not a traced tensor")
        return self.tracer.descs[a]  # type: ignore[return-value]

    def arg_desc(self, a: Any) -> Desc | None:
        if isinstance(a, fx.Node):
            d = self.tracer.descs.get(a)
            return d if isinstance(d, tuple) else None
        return None

    def link(self, a: _Ax | None, b: _Ax | None) -> _Ax | None:
        """Require two axes to share a basis; returns the surviving descriptor."""
        if a is None and b is None:
            return None
        if a is None or b is None:
            v = (a or b)
            assert v is not None
            self.tracer.uf.union(v.var, FIXED, self.where)
            return v
        if a.inner != b.inner:
            raise self.fail(f"links a feature axis with inner size {a.inner} to one with inner size {b.inner}")
        self.tracer.uf.union(a.var, b.var, self.where)
        return a

    def bind(self, key: str, axis: int, d: _Ax | None, role: Role) -> None:
        self.tracer.bind(key, axis, d, role, self.where)

    def param_axis(self, key: str, axis: int, size: int, role: Role) -> _Ax:
        return self.tracer.param_axis(key, axis, size, role, self.where)

    def require_fixed(self, d: Desc, dims: Sequence[int], why: str) -> None:
        for i in dims:
            if d[i] is not None and self.tracer.uf.find(d[i].var) != FIXED:  # type: ignore[union-attr]
                raise self.fail(f"{why} (dim {i % len(d)} carries permutable features)")


# ----------------------------------------------------------------------------------------------------------------
# the tracer


class _LeafTracer(fx.Tracer):
    """The package's one fx tracer: keeps :func:`is_leaf_module` modules as leaves (see :func:`trace`)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf_module(m) or super().is_leaf_module(m, module_qualified_name)


class _SpecTracer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, model: nn.Module) -> None:
        super().__init__(gm)
        self.model = model
        self.uf = _UnionFind()
        self.descs: dict[fx.Node, Desc | None] = {}
        self.bound: dict[tuple[str, int], tuple[_Ax, Role, SiteKind]] = {}
        self.kind: SiteKind = "other"
        self.order: list[tuple[str, int]] = []
        self.sites: list[tuple[int, Site]] = []
        self.calls: dict[str, int] = {}
        self.state_keys = set(model.state_dict().keys())
        self.state_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def describe_node(self, node: fx.Node) -> str:
        if node.op == "call_module":
            m = self.model.get_submodule(str(node.target))
            return f"fx node {node.name!r} (call_module {node.target!r} of type {type(m).__name__})"
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", node.target)
        mod = getattr(node.target, "__module__", None)
        target_s = f"{mod}.{target}" if mod and not isinstance(node.target, str) else str(target)
        return f"fx node {node.name!r} ({node.op} {target_s})"

    def param_axis(self, key: str, axis: int, size: int, role: Role, where: str) -> _Ax:
        if (key, axis) in self.bound:
            return self.bound[(key, axis)][0]
        ax = _Ax(self.uf.new(size))
        self.bound[(key, axis)] = (ax, role, self.kind)
        self.order.append((key, axis))
        return ax

    def bind(self, key: str, axis: int, d: _Ax | None, role: Role, where: str) -> None:
        if key not in self.state_keys:
            return
        length = self.state_shapes[key][axis]
        if d is None:
            d = _Ax(FIXED)
        elif self.uf.size[self.uf.find(d.var)] not in (None, length // d.inner) or length % d.inner:
            raise UnsupportedOpError(f"{where}: axis {axis} of {key!r} has length {length}, which does not match "
                                     f"a feature axis of {self.uf.size[self.uf.find(d.var)]}×{d.inner}")
        if (key, axis) in self.bound:
            old = self.bound[(key, axis)][0]
            if old.inner != d.inner:
                raise UnsupportedOpError(f"{where}: {key!r} axis {axis} is used with two different layouts")
            self.uf.union(old.var, d.var, where)
            return
        self.bound[(key, axis)] = (d, role, self.kind)
        self.order.append((key, axis))

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

    def _describe(self, ctx: _Ctx) -> Desc | None:
        n, out = ctx.node, ctx.out
        if n.op == "placeholder":
            return tuple(None for _ in range(out.dim())) if isinstance(out, torch.Tensor) else None
        if n.op == "output":
            for a in _flat_nodes(n.args):
                d = self.descs.get(a)
                if isinstance(d, tuple):
                    for ax in d:
                        ctx.link(ax, None)
            return None
        if n.op == "get_attr":
            if not isinstance(out, torch.Tensor):
                return None
            key = str(n.target)
            if key not in self.state_keys:
                return tuple(None for _ in range(out.dim()))
            return tuple(ctx.param_axis(key, i, s, "out") if s > 1 else None for i, s in enumerate(out.shape))
        if not isinstance(out, torch.Tensor):
            if _contains_tensor(out):
                raise ctx.fail("returns several tensors; no handler describes how their axes map")
            if n.op == "call_module" or not _shape_query(n):
                raise ctx.fail("returns a non-tensor value that is not a shape query")
            return None
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
            self._record_sites(ctx, name, call, kind, desc)
            return desc
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

    def _record_sites(self, ctx: _Ctx, name: str, call: int, kind: SiteKind, desc: Desc) -> None:
        out_ax = _site_axis(desc)
        if out_ax is not None:
            self.sites.append((out_ax.var, Site(name, call, "out", kind, ctx.node.name)))
        if kind == "producer" and ctx.node.args and isinstance(ctx.node.args[0], fx.Node):
            in_desc = self.descs.get(ctx.node.args[0])
            in_ax = _site_axis(in_desc) if isinstance(in_desc, tuple) else None
            if in_ax is not None:
                self.sites.append((in_ax.var, Site(name, call, "in", "consumer", ctx.node.name)))

    def build(self) -> PermutationSpec:
        uf = self.uf
        members: dict[int, list[PermAxis]] = {}
        first: dict[int, int] = {}
        for i, (key, axis) in enumerate(self.order):
            ax, role, kind = self.bound[(key, axis)]
            r = uf.find(ax.var)
            if r == FIXED:
                continue
            members.setdefault(r, []).append(PermAxis(key, axis, ax.inner, role, kind))
            first.setdefault(r, i)
        sites: dict[int, list[Site]] = {}
        for v, s in self.sites:
            r = uf.find(v)
            if r in members and s not in sites.setdefault(r, []):
                sites[r].append(s)
        groups = []
        used: set[str] = set()
        for r in sorted(members, key=lambda r: first[r]):
            size = uf.size[r]
            assert size is not None
            if size <= 1:
                continue
            axes = tuple(members[r])
            outs = [a.key.rsplit(".", 1)[0] if "." in a.key else a.key for a in axes if a.role == "out"]
            name = outs[0] if outs else axes[0].key
            while name in used:
                name = name + "'"
            used.add(name)
            groups.append(PermGroup(name, size, axes, tuple(sites.get(r, ()))))
        return PermutationSpec(tuple(groups), tuple(self.state_shapes.items()))


def _site_axis(desc: Desc) -> _Ax | None:
    """The channel axis of a ``N×C``/``N×C×H×W`` (dim 1) or ``N×L×C`` (last dim) output, if it is the only one."""
    if len(desc) in (2, 4):
        ch = 1
    elif len(desc) == 3:
        ch = 2
    else:
        return None
    ax = desc[ch]
    if ax is None or ax.inner != 1 or any(d is not None for i, d in enumerate(desc) if i != ch):
        return None
    return ax


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


def _bind_weight(ctx: _Ctx, m: nn.Module, in_ax: _Ax | None) -> _Ax:
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
    if d[1] is not None and d[1].inner != 1:
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


def _bind_channel_params(ctx: _Ctx, m: nn.Module, ax: _Ax | None, names: Sequence[str]) -> None:
    if ax is not None and ax.inner != 1:
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
    result: list[_Ax | None] = [None] * nd
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
def _reshape(ctx: _Ctx) -> Desc:
    return _reshape_desc(ctx, ctx.desc(0), tuple(ctx.args[0].shape), tuple(ctx.out.shape))


register_module_handler(nn.Flatten, nn.Unflatten, kind="other")(
    lambda ctx, m: _reshape_desc(ctx, ctx.desc(0), tuple(ctx.args[0].shape), tuple(ctx.out.shape)))


def _reshape_desc(ctx: _Ctx, d: Desc, s_in: tuple[int, ...], s_out: tuple[int, ...]) -> Desc:
    """Map feature axes through a contiguous reshape; a channel axis must stay the leading factor of one dim."""
    out: list[_Ax | None] = [None] * len(s_out)
    for k, ax in enumerate(d):
        if ax is None:
            continue
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


@register_function_handler(torch.transpose, torch.permute, torch.movedim, torch.swapaxes,
                           methods=("transpose", "permute", "movedim", "swapaxes", "t"))
def _axis_permute(ctx: _Ctx) -> Desc:
    d = ctx.desc(0)
    x = ctx.args[0]
    sizes = [2 + i for i in range(x.dim())]
    dummy = torch.empty(sizes)
    fn = getattr(torch, str(ctx.node.target)) if ctx.node.op == "call_method" else ctx.node.target
    moved = fn(dummy, *ctx.args[1:], **ctx.kwargs)  # type: ignore[operator]
    return tuple(d[sizes.index(s)] for s in moved.shape)


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
    result: list[_Ax | None] = [None] * nd
    assert isinstance(tensors, (list, tuple))
    for a in tensors:
        d = ctx.arg_desc(a)
        if d is None:
            d = tuple(None for _ in range(nd))
        for i in range(nd):
            if i == dim:
                ctx.require_fixed(d, [i], "concatenation along a permutable axis")
            elif result[i] is None and d[i] is None:
                continue
            else:
                result[i] = ctx.link(result[i], d[i])
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
    tracer = _SpecTracer(gm, model)
    was_training = model.training
    model.eval()
    try:
        tracer.run(example_input)
    finally:
        model.train(was_training)
    return tracer.build()
