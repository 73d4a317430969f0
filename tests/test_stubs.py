"""The `.pyi` stubs match the built module: every public name is stubbed, and
every stubbed function and method has the runtime's parameter names, order
and defaults (read with `inspect.signature` from the native text signatures
and the Python wrappers)."""

import ast
import inspect
from pathlib import Path

import pytest

import aios_rt

STUB = Path(aios_rt.__file__).with_name("__init__.pyi")


def _stub_tree():
    return ast.parse(STUB.read_text())


def _params(fn: ast.FunctionDef):
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args]
    defaults = [None] * (len(names) - len(a.defaults)) + [ast.unparse(d) for d in a.defaults]
    out = list(zip(names, defaults))
    if a.vararg:
        out.append(("*" + a.vararg.arg, None))
    out += [(p.arg, ast.unparse(d) if d is not None else None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append(("**" + a.kwarg.arg, None))
    return [(n, d) for n, d in out if n not in ("self", "cls")]


def _runtime_params(obj):
    sig = inspect.signature(obj)
    out = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls", "$self", "$cls"):
            continue
        name = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        default = None if p.default is p.empty else repr(p.default)
        out.append((name, default))
    return out


def _stubbed():
    """(qualified name, stub params, runtime object) for every stubbed callable."""
    items = []
    for node in _stub_tree().body:
        if isinstance(node, ast.FunctionDef):
            items.append((node.name, _params(node), getattr(aios_rt, node.name, None)))
        elif isinstance(node, ast.ClassDef):
            cls = getattr(aios_rt, node.name, None)
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and not any(
                    isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list
                ):
                    # A native class's signature is on the class (its __new__).
                    target = cls if fn.name == "__init__" else getattr(cls, fn.name, None)
                    items.append((f"{node.name}.{fn.name}", _params(fn), target))
    return items


def test_every_public_name_is_stubbed():
    names = set()
    for node in _stub_tree().body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    missing = [n for n in aios_rt.__all__ if n not in names]
    assert not missing, f"public names without a stub: {missing}"


@pytest.mark.parametrize("name,params,obj", _stubbed(), ids=[i[0] for i in _stubbed()])
def test_stub_signature_matches_the_module(name, params, obj):
    assert obj is not None, f"{name} is stubbed but not in the module"
    try:
        runtime = _runtime_params(obj)
    except (TypeError, ValueError):
        pytest.skip(f"{name}: the runtime object has no introspectable signature")
    assert [n for n, _ in params] == [n for n, _ in runtime], f"{name}: stub {params} vs module {runtime}"
    for (n, sd), (_, rd) in zip(params, runtime):
        assert (sd is None) == (rd is None), f"{name}({n}): stub default {sd}, module {rd}"
        # The native code applies some defaults itself (its signature says
        # None); the stub then documents the effective value.
        if sd not in (None, "...") and rd not in ("None", "Ellipsis"):
            assert ast.literal_eval(sd) == ast.literal_eval(rd), f"{name}({n}): stub default {sd}, module {rd}"


def test_error_classes_derive_from_the_standard_ones():
    assert issubclass(aios_rt.InputError, ValueError) and issubclass(aios_rt.InputError, aios_rt.AiosError)
    assert issubclass(aios_rt.AiosIOError, OSError)
    assert issubclass(aios_rt.FormatError, ValueError)
    from aios_train.export import FormatError as TrainFormatError

    assert TrainFormatError is aios_rt.FormatError
    assert aios_rt._native.InputError is aios_rt.InputError
