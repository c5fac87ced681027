"""Graph utilities shared by the engine and the cost model: what a traced model reads and
writes, where each parameter enters (by tensor identity), which nodes a parameter can change
and when each node is last used, and what a trace depends on."""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

__all__ = ["DROPOUT_FUNCS", "affected_nodes", "dropout_active", "functionalize", "is_inplace", "last_uses",
           "param_sources", "structure_signature"]

DROPOUT_FUNCS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                 torch.dropout)
_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def dropout_active(node: Node) -> bool:
    """Whether a functional dropout call drops anything (F.dropout defaults to training=True)."""
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    return bool(training) and p != 0


def is_inplace(node: Node, module=None) -> bool:
    """Whether evaluating ``node`` would write into its first input."""
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in _INPLACE_FUNCS or (name.endswith("_") and not name.endswith("__")):
            return True
        if "inplace" in node.kwargs:
            return bool(node.kwargs["inplace"])
        pos = _inplace_position(node.target)
        return pos is not None and len(node.args) > pos and node.args[pos] is True
    return False


def _inplace_position(fn):
    """Position of an ``inplace`` parameter of ``fn`` (``F.relu(x, True)``), or None."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


# Ops whose result may share memory with their input: an in-place op on such a result also
# writes into the input, which the engine's graph rewrite cannot follow.
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute", "t",
                 "expand", "expand_as", "squeeze", "unsqueeze", "narrow", "select", "chunk", "split", "unbind",
                 "detach", "contiguous", "to", "type", "type_as", "float", "double", "half", "movedim", "T", "mT"}
_VIEW_FUNCS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
               torch.narrow, torch.select, torch.chunk, torch.split, torch.unbind, operator.getitem, torch.t,
               torch.detach, torch.movedim}
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def _may_alias(node: Node, modules: dict) -> bool:
    if node.op == "placeholder" or node.op == "get_attr":
        return True  # the caller's input, or a parameter/buffer
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCS
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _VIEW_MODULES)
    return False


def functionalize(graph: fx.Graph, modules: dict) -> bool:
    """Rewrite in-place ops so that the graph reads like an out-of-place program: after
    ``n = y.relu_()``, every later reader of ``y`` reads ``n`` (the engine evaluates ``n`` on a
    private copy, so the base value of ``y`` stays what earlier readers saw). Returns False when
    a mutation cannot be followed (an in-place op on a view or on the model's input,
    ``y[i] = v``, ``out=``): the caller must not use the graph."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is operator.setitem:
            return False
        if "out" in n.kwargs:
            return False
        if not is_inplace(n, modules.get(n.target) if n.op == "call_module" else None):
            continue
        if not n.args or not isinstance(n.args[0], Node):
            return False
        y = n.args[0]
        if _may_alias(y, modules):
            return False
        for user in list(y.users):
            if user is not n and order[user] > order[n]:
                user.replace_input_with(y, n)
    graph.lint()
    return True


def param_sources(graph: fx.Graph, root: nn.Module, modules: dict) -> dict:
    """``{id(tensor): [(node, path), ...]}``: every graph node where a parameter enters, found
    by tensor identity (tied weights, a module applied twice). ``path`` is the parameter's name
    inside the called leaf module (``"weight"``, ``"out_proj.weight"``), or None for a
    ``get_attr`` of the tensor itself."""
    out: dict = {}
    for n in graph.nodes:
        if n.op == "call_module":
            for path, t in modules[n.target].named_parameters(remove_duplicate=False):
                entry = out.setdefault(id(t), [])
                if not any(s is n for s, _ in entry):
                    entry.append((n, path))
        elif n.op == "get_attr":
            obj = root
            for part in n.target.split("."):
                obj = getattr(obj, part, None)  # None: a constant tracing created, not a parameter
            if isinstance(obj, torch.Tensor):
                out.setdefault(id(obj), []).append((n, None))
    return out


def affected_nodes(sources) -> set:
    """Every node a change at ``sources`` can reach."""
    seen, todo = set(), list(sources)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return seen


def last_uses(nodes) -> dict:
    """``{node: the last of nodes that reads it}``, so values can be freed after that node."""
    last = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last[a] = n
    return last


def structure_signature(model: nn.Module) -> tuple:
    """What a trace depends on, cheap to recompute on every call: module and parameter identities,
    shapes, dtypes and devices, train/eval flags, plain attributes and small containers of them
    (which Python control flow may read: ``self.use_skip``, ``self.flags["skip"]``) and hooks.
    Any change means the model must be traced again."""
    mods = []
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = tuple((k, _fingerprint(v)) for k, v in m.__dict__.items()
                      if k not in ("_parameters", "_buffers", "_modules") and not isinstance(v, torch.Tensor))
        hooks = (len(m._forward_hooks), len(m._forward_pre_hooks))
        mods.append((name, id(m), type(m), attrs, hooks))
    params = tuple((n, id(p), tuple(p.shape), p.dtype, p.device, p.requires_grad)
                   for n, p in model.named_parameters(remove_duplicate=False))
    bufs = tuple((n, id(b), tuple(b.shape), b.dtype) for n, b in model.named_buffers(remove_duplicate=False))
    return tuple(mods), params, bufs


_PLAIN = (bool, int, float, str, bytes, type(None))


def _fingerprint(v, depth: int = 0):
    """A hashable summary of an attribute: plain values themselves, small containers and simple
    config objects by content, anything else by identity."""
    if isinstance(v, _PLAIN):
        return v
    if depth < 3 and isinstance(v, (list, tuple, set, frozenset)) and len(v) <= 64:
        items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
        return (type(v).__name__,) + tuple(_fingerprint(e, depth + 1) for e in items)
    if depth < 3 and isinstance(v, dict) and len(v) <= 64:
        return ("dict",) + tuple((repr(k), _fingerprint(e, depth + 1)) for k, e in v.items())
    if depth < 2 and not isinstance(v, (nn.Module, torch.Tensor)) and hasattr(v, "__dict__") \
            and not callable(v) and len(vars(v)) <= 64:
        return (type(v).__name__,) + tuple((k, _fingerprint(e, depth + 1)) for k, e in vars(v).items())
    return ("id", id(v))
