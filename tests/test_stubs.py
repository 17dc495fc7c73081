"""The type stubs of the native module list exactly its functions, with the same parameters."""

import ast
import inspect
import pathlib

import hidden_align as ha
from hidden_align import _native


def test_stub_matches_native_module():
    stub = pathlib.Path(ha.__file__).with_name("_native.pyi").read_text()
    body = ast.parse(stub).body
    declared = {n.name: n for n in body if isinstance(n, ast.FunctionDef)}
    constants = {n.target.id for n in body if isinstance(n, ast.AnnAssign)} - {"__version__"}
    exported = {k for k in dir(_native) if not k.startswith("__")}
    assert set(declared) | constants == exported
    for name, node in declared.items():
        params = [a.arg for a in node.args.args]
        native = list(inspect.signature(getattr(_native, name)).parameters)
        assert params == native, name
