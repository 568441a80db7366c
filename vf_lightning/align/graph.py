"""One traced model graph answers every structural question (DESIGN §3).

:meth:`ModelGraph.of` traces a model once (cached per model object) and derives from the graph, never from
module names: the Conv/Linear *producers* in forward order, the *output layers*, the REPAIR correction sites
(method-spec §5.2), the variance-ratio sites (inputs of the activations), truncated graphs that stop once
given nodes are computed (sequential REPAIR levels, PFM prefixes) and the permutation spec.

Residual structure is read off the graph. A *residual add* is an add/sub node with at least two operands that
depend on the input. At each one the operands are followed back to their latest common ancestor, the *fork*;
the operand whose path from the fork holds the most producers is the *residual branch*, the others are
*shortcuts*. The nodes on a shortcut path (fork included) carry the *residual stream*. The spec rule corrects
every producer except output layers, producers in the stream (projection shortcuts) and producers whose output
reaches the stream through single-input ops only without ending a branch there (the ResNet stem).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from vf_lightning.align.spec import (
    AFFINE_TYPES,
    NORM_TYPES,
    PermutationSpec,
    build_permutation_spec,
    trace,
)

__all__ = ["AFFINE_TYPES", "CORRECTION_RULES", "NORM_TYPES", "GraphWalk", "ModelGraph", "trace"]

CORRECTION_RULES = ("spec", "all")
_ADD_FUNCTIONS: set[Callable[..., Any]] = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add,
                                           torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, ModelGraph] = weakref.WeakKeyDictionary()


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_shape_query(n: fx.Node) -> bool:
    if n.op == "call_method":
        return str(n.target) in _SHAPE_METHODS
    return n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS


class ModelGraph:
    """The fx trace of one model and everything structural derived from it; build with :meth:`of`.

    ``gm`` is the trace (it shares the model's leaf modules and parameters), ``producers`` the Conv/Linear
    modules in forward order and ``output_layers`` the producers from which the model output is reached
    without passing another producer.
    """

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._model = weakref.ref(model)
        self._nodes = list(gm.graph.nodes)
        self._index = {n: i for i, n in enumerate(self._nodes)}
        self._calls: dict[str, list[fx.Node]] = {}
        for n in self._nodes:
            if n.op == "call_module":
                self._calls.setdefault(str(n.target), []).append(n)
        self._producer_nodes = [n for n in self._nodes if self._is_producer(n)]
        self.producers: list[str] = list(dict.fromkeys(str(n.target) for n in self._producer_nodes))
        self._data = self._data_nodes()
        heads = self._output_producers()
        self.output_layers: list[str] = [p for p in self.producers if any(n in heads for n in self._calls[p])]
        self._uncorrected = heads | self._residual_exclusions()
        self._specs: dict[tuple[Any, ...], PermutationSpec] = {}
        self.traced_in_eval = not any(m.training for m in model.modules())  # no `self.training` branch baked in
        self._pairs: weakref.WeakKeyDictionary[fx.GraphModule, fx.GraphModule | None] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: nn.Module) -> ModelGraph:
        """The graph of ``model``: traced once and cached while the model's modules stay the same objects."""
        cached = _GRAPHS.get(model)
        if cached is not None and cached._traced_from(model):
            return cached
        graph = cls(model, trace(model))
        _GRAPHS[model] = graph
        return graph

    # -- lookups ---------------------------------------------------------------------------------------------
    def calls(self, module_name: str) -> list[fx.Node]:
        """The ``call_module`` nodes of ``module_name`` in forward order (empty if it never runs as a leaf)."""
        return list(self._calls.get(module_name, ()))

    def node_of(self, module_name: str) -> fx.Node:
        """The one node calling leaf module ``module_name``; fails if it is not called exactly once."""
        calls = self._calls.get(module_name, [])
        if len(calls) != 1:
            why = "is not a leaf module called in" if not calls else f"is called {len(calls)} times in"
            raise ValueError(f"{module_name!r} {why} the forward of {self._model_name()}; leaf modules are "
                             f"{list(self._calls)}")
        return calls[0]

    def sole_source(self, module_name: str) -> str | None:
        """The leaf module whose output is exactly what ``module_name`` reads, or ``None``.

        Both are called once and that output feeds nothing else (no in-place op can touch it in between), so
        ``module_name``'s input statistics are that module's output statistics.
        """
        calls = self._calls.get(module_name, [])
        src = calls[0].args[0] if len(calls) == 1 and calls[0].args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            return None
        name = str(src.target)
        return name if len(self._calls.get(name, [])) == 1 else None

    def module(self, module_name: str) -> nn.Module:
        """The leaf module ``module_name`` (the model's own object)."""
        return self.gm.get_submodule(module_name)

    # -- sites -----------------------------------------------------------------------------------------------
    def correction_sites(self, rule: str | Sequence[str] = "spec") -> list[str]:
        """Producers that REPAIR-style corrections act on, in forward order.

        ``spec`` (method-spec §5.2): every producer but the output layers, the shortcut projections and those
        writing straight into a residual stream (VGG: all convs; ResNet: conv1/conv2 of every block). ``all``:
        every producer but the output layers. A list of module names: exactly those (they must be producers).
        """
        if isinstance(rule, str):
            if rule == "spec":
                return [p for p in self.producers if not any(n in self._uncorrected for n in self._calls[p])]
            if rule == "all":
                return [p for p in self.producers if p not in self.output_layers]
            raise ValueError(f"unknown correction-site rule {rule!r}; use one of {list(CORRECTION_RULES)} or a "
                             "list of module names")
        names = list(rule)
        unknown = [n for n in names if n not in self.producers]
        if unknown:
            raise ValueError(f"correction site(s) {unknown} are not Conv/Linear layers of {self._model_name()}; "
                             f"valid producers are {self.producers}")
        chosen = set(names)
        return [p for p in self.producers if p in chosen]

    def variance_sites(self, exclude: Iterable[str] = ()) -> list[str]:
        """Inputs of the activations, one per non-output producer (and not in ``exclude``), in producer order.

        The affine norm layer that directly and only consumes the producer's output, else the producer.
        """
        skip = set(exclude) | set(self.output_layers)
        sites: list[str] = []
        for p in self.producers:
            if p in skip:
                continue
            site = p
            users = list(self._calls[p][0].users)
            if len(users) == 1 and users[0].op == "call_module":
                norm = self.module(str(users[0].target))
                if isinstance(norm, NORM_TYPES) and getattr(norm, "weight", None) is not None:
                    site = str(users[0].target)
            if site not in sites:
                sites.append(site)
        return sites

    # -- derived graphs --------------------------------------------------------------------------------------
    def truncated(self, targets: Sequence[fx.Node | str], root: nn.Module | None = None) -> fx.GraphModule:
        """A graph module that runs only until ``targets`` (nodes of ``gm`` or leaf module names) are computed
        and returns them as a tuple; ``root`` supplies its modules (default: this trace's, i.e. the model's)."""
        nodes = [t if isinstance(t, fx.Node) else self.node_of(t) for t in targets]
        foreign = [n.name for n in nodes if self._index.get(n) is None]
        if foreign:
            raise ValueError(f"node(s) {foreign} are not nodes of the traced graph of {self._model_name()}")
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        wanted = set(nodes)
        for node in self._nodes:
            if node.op == "output":
                break
            env[node] = graph.node_copy(node, lambda n: env[n])
            wanted.discard(node)
            if not wanted and node.op != "placeholder":
                break
        graph.output(tuple(env[n] for n in nodes))
        gm = fx.GraphModule(root if root is not None else self.gm, graph)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        return gm

    def lockstep(self, other: ModelGraph) -> fx.GraphModule | None:
        """One graph module running this model and ``other`` (traced alike) node by node: each node of this
        model, then the same node of ``other``; it returns both outputs as a pair. ``None`` when the two traces
        differ in any op or module/attribute name, or when either trace may not run as its model's forward
        (:meth:`runs_as_traced`). Built once per pair of traces.

        It calls the models' own leaf modules, so their hooks fire, in each model's own order, with the same
        values as two separate forwards (each model reads its own copy of the input, so neither can change the
        other's or the caller's); but a value of this model is seen by ``other``'s hook at the same node while it
        is still fresh in cache, and need not outlive ``other``'s forward reaching that node (paired statistics,
        :func:`vf_lightning.align.statistics.activation_statistics`).
        """
        if not (self.runs_as_traced() and other.runs_as_traced()):
            return None
        if other.gm in self._pairs:
            return self._pairs[other.gm]
        pair: fx.GraphModule | None = None
        if len(self._nodes) == len(other._nodes) and all(
                a.op == b.op and a.target == b.target for a, b in zip(self._nodes, other._nodes)):
            root = nn.Module()
            root.a, root.b = self.gm, other.gm
            graph = fx.Graph()
            env: dict[fx.Node, fx.Node] = {}
            outputs: list[Any] = []
            for a, b in zip(self._nodes, other._nodes):
                if a.op == "placeholder":
                    x = graph.node_copy(a)
                    env[a], env[b] = (graph.call_method("clone", (x,)) for _ in range(2))
                    continue
                if a.op == "output":
                    outputs = [fx.node.map_arg(n.args[0], env.__getitem__) for n in (a, b)]
                    continue
                for side, n in (("a", a), ("b", b)):
                    env[n] = graph.node_copy(n, env.__getitem__)
                    if n.op in ("call_module", "get_attr"):
                        env[n].target = f"{side}.{n.target}"
            graph.output(tuple(outputs))
            pair = fx.GraphModule(root, graph)
        self._pairs[other.gm] = pair
        return pair

    def runs_as_traced(self) -> bool:
        """Whether running the trace now computes what calling the model does: it was traced in eval mode (a
        forward that reads ``self.training`` was traced for eval, as statistics passes run), it has one input,
        and no hook sits where the trace never calls (the model itself, a non-leaf module, every module)."""
        model = self._model()
        if model is None or not self.traced_in_eval or sum(n.op == "placeholder" for n in self._nodes) != 1:
            return False
        if any(getattr(nn.modules.module, h) for h in ("_global_forward_hooks", "_global_forward_pre_hooks")):
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks
                       for name, m in model.named_modules() if name not in self._calls)

    def spec(self, example_input: torch.Tensor) -> PermutationSpec:
        """The permutation spec, built over this trace (cached per input shape and state-dict shapes)."""
        model = self._model()
        if model is None:
            raise ValueError("the model of this ModelGraph no longer exists")
        key = (tuple(example_input.shape), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
        if key not in self._specs:
            self._specs[key] = build_permutation_spec(model, example_input, self.gm)
        return self._specs[key]

    # -- analysis --------------------------------------------------------------------------------------------
    def _model_name(self) -> str:
        model = self._model()
        return type(model).__name__ if model is not None else "the model"

    def _traced_from(self, model: nn.Module) -> bool:
        """Whether every module and attribute the trace uses is still the same object in ``model``."""
        try:
            return all(_attr(model, str(n.target)) is _attr(self.gm, str(n.target))
                       for n in self._nodes if n.op in ("call_module", "get_attr"))
        except AttributeError:
            return False

    def _is_producer(self, n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(self.module(str(n.target)), AFFINE_TYPES)

    def _data_nodes(self) -> set[fx.Node]:
        """Nodes whose value depends on the input through data (not parameters, not shape queries)."""
        data: set[fx.Node] = set()
        for n in self._nodes:
            if n.op == "placeholder" or (n.op not in ("get_attr", "output") and not _is_shape_query(n)
                                         and any(i in data for i in n.all_input_nodes)):
                data.add(n)
        return data

    def _inputs(self, n: fx.Node) -> list[fx.Node]:
        return [i for i in dict.fromkeys(n.all_input_nodes) if i in self._data]

    def _is_residual_add(self, n: fx.Node) -> bool:
        is_add = (n.op == "call_function" and n.target in _ADD_FUNCTIONS) or (
            n.op == "call_method" and str(n.target) in _ADD_METHODS)
        return is_add and len(self._inputs(n)) >= 2

    def _output_producers(self) -> set[fx.Node]:
        """Producer nodes reaching the output without passing another producer."""
        found: set[fx.Node] = set()
        stack = [i for n in self._nodes if n.op == "output" for i in self._inputs(n)]
        seen: set[fx.Node] = set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if self._is_producer(n):
                found.add(n)
            else:
                stack.extend(self._inputs(n))
        return found

    def _branch_end(self, operand: fx.Node, fork: fx.Node) -> fx.Node | None:
        """The producer ending a branch: followed back from ``operand`` through single-input ops to the fork."""
        n = operand
        while not self._is_producer(n):
            inputs = self._inputs(n)
            if n is fork or self._is_residual_add(n) or len(inputs) != 1:
                return None
            n = inputs[0]
        return n

    def _residual_exclusions(self) -> set[fx.Node]:
        """Producer nodes that a residual structure keeps uncorrected (shortcut projections, stream writers)."""
        anc: dict[fx.Node, int] = {}  # bit i set: node i is an ancestor (or the node itself)
        for n in self._nodes:
            if n in self._data:
                bits = 1 << self._index[n]
                for i in self._inputs(n):
                    bits |= anc[i]
                anc[n] = bits

        def has(bits: int, n: fx.Node) -> bool:
            return bool(bits >> self._index[n] & 1)

        stream: dict[fx.Node, set[fx.Node]] = {}  # stream node -> the residual adds whose shortcut it is on
        ends: dict[fx.Node, set[fx.Node]] = {}  # branch-end producer -> the adds it ends a branch of
        for add in self._nodes:
            if add not in self._data or not self._is_residual_add(add):
                continue
            operands = self._inputs(add)
            common = -1
            for o in operands:
                common &= anc[o]
            if common <= 0:
                continue  # operands share no ancestor (several inputs): no residual structure
            fork = self._nodes[common.bit_length() - 1]
            inside = [p for p in self._producer_nodes if p in anc and p is not fork and has(anc[p], fork)]
            counts = [sum(1 for p in inside if has(anc[o], p)) for o in operands]
            top = max(counts)
            if top == 0:
                continue
            for o, count in zip(operands, counts):
                if count == top:
                    end = self._branch_end(o, fork)
                    if end is not None:
                        ends.setdefault(end, set()).add(add)
                    continue
                for n in self._nodes[self._index[fork]: self._index[o] + 1]:
                    if n in anc and has(anc[o], n) and has(anc[n], fork):
                        stream.setdefault(n, set()).add(add)
        excluded: set[fx.Node] = set()
        for p in self._producer_nodes:
            if self._lands_in_stream(p, stream, ends.get(p, set())):
                excluded.add(p)
        return excluded

    def _lands_in_stream(self, p: fx.Node, stream: dict[fx.Node, set[fx.Node]], ends: set[fx.Node]) -> bool:
        """Whether ``p`` or what it feeds through single-input ops lies on the stream of an add it does not end."""
        stack, seen = [p], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if stream.get(n, set()) - ends:
                return True
            for u in n.users:
                if u in self._data and not self._is_producer(u) and not self._is_residual_add(u) \
                        and self._inputs(u) == [n]:
                    stack.append(u)
        return False


_INPLACE_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


class GraphWalk:
    """Run a traced graph over a fixed list of input batches a few nodes at a time, keeping every computed value
    that a node not yet computed still reads (per batch).

    :meth:`compute` evaluates target nodes from what is kept (each node once until :meth:`invalidate` drops it);
    the sequential corrections use it to visit their levels in one forward pass overall instead of one truncated
    pass from the input per level. In-place ops run out of place (same values: each one's operand has no other
    reader); :meth:`create` returns ``None`` for a graph where an in-place op's operand has another reader.
    """

    def __init__(self, graph: ModelGraph, inputs: Sequence[torch.Tensor]) -> None:
        self.graph = graph
        self.gm = graph.gm
        self._index = graph._index
        placeholder = next(n for n in graph._nodes if n.op == "placeholder")  # the one input (see supported)
        self.envs: list[dict[fx.Node, Any]] = [{placeholder: x} for x in inputs]

    @staticmethod
    def supported(graph: ModelGraph) -> bool:
        """Whether every in-place op of the graph is the only reader of its operand (and it has one input)."""
        placeholders = [n for n in graph._nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            return False
        for n in graph._nodes:
            if _inplace(n, graph.gm):
                first = n.args[0] if n.args else None
                if not isinstance(first, fx.Node) or len(first.users) > 1:
                    return False
        return True

    def compute(self, env: dict[fx.Node, Any], targets: Iterable[fx.Node]) -> list[Any]:
        """The values of ``targets`` in one batch's ``env``, computing what is missing in graph order."""
        targets = list(targets)
        need: set[fx.Node] = set()
        stack = [t for t in targets if t not in env]
        while stack:
            n = stack.pop()
            if n in need or n in env:
                continue
            need.add(n)
            stack.extend(a for a in n.all_input_nodes if a not in env)
        for n in sorted(need, key=self._index.__getitem__):
            env[n] = self._run(n, env)
        return [env[t] for t in targets]

    def _run(self, n: fx.Node, env: dict[fx.Node, Any]) -> Any:
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = dict(fx.node.map_arg(n.kwargs, lambda a: env[a]))
        if n.op == "get_attr":
            return _attr(self.gm, str(n.target))
        if n.op == "call_module":
            mod = self.gm.get_submodule(str(n.target))
            if getattr(mod, "inplace", False) is True:
                mod.inplace = False  # type: ignore[assignment]
                try:
                    return mod(*args, **kwargs)
                finally:
                    mod.inplace = True  # type: ignore[assignment]
            return mod(*args, **kwargs)
        if n.op == "call_function":
            fn = _INPLACE_FUNCTIONS.get(n.target, n.target)  # type: ignore[arg-type]
            if kwargs.get("inplace") is True:
                kwargs["inplace"] = False
            return fn(*args, **kwargs)
        if n.op == "call_method":
            name = str(n.target)
            if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
                name = name[:-1]
            return getattr(args[0], name)(*args[1:], **kwargs)
        raise ValueError(f"GraphWalk cannot run node {n.name} ({n.op})")

    def invalidate(self, nodes: Iterable[fx.Node]) -> None:
        """Forget ``nodes`` and everything computed from them (their modules changed)."""
        drop = set(nodes)
        for n in self.graph._nodes:
            if any(a in drop for a in n.all_input_nodes):
                drop.add(n)
        for env in self.envs:
            for n in drop:
                env.pop(n, None)

    def release(self) -> None:
        """Drop every value all of whose readers are computed (nothing left needs it)."""
        for env in self.envs:
            dead = [n for n in env if n.op != "placeholder" and n.users and all(u in env for u in n.users)]
            for n in dead:
                del env[n]

    def live_bytes(self) -> int:
        """Bytes of the tensors kept over all batches."""
        seen: set[int] = set()
        total = 0
        for env in self.envs:
            for v in env.values():
                if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    total += v.numel() * v.element_size()
        return total


def _inplace(n: fx.Node, root: nn.Module) -> bool:
    if n.op == "call_function":
        return n.target in _INPLACE_FUNCTIONS or n.kwargs.get("inplace") is True
    if n.op == "call_method":
        name = str(n.target)
        return name.endswith("_") and not name.startswith("_")
    if n.op == "call_module":
        return getattr(root.get_submodule(str(n.target)), "inplace", False) is True
    return False
