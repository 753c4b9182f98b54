"""Security invariants of the package, checked on its source: nothing is unpickled, servers stay on loopback.

Why a scan: one `torch.load(path)` added anywhere would execute whatever a downloaded checkpoint contains.
"""

import ast
import inspect
from pathlib import Path

import pytest

import margrpo

PACKAGE = Path(margrpo.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
GUARDED_LOADER = PACKAGE / "utils" / "safe_load.py"  # safe_torch_load: the one torch.load, weights_only=True


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_the_package_has_sources_to_scan():
    assert len(SOURCES) > 50 and GUARDED_LOADER in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_pickle_and_no_unguarded_torch_load(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node, name in _calls(tree):
        assert name not in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "dill.load",
                            "torch.jit.load", "numpy.load", "np.load"), f"{path}:{node.lineno}: {name}"
        if name == "torch.load":
            kw = {k.arg: k.value for k in node.keywords}
            assert path == GUARDED_LOADER, f"{path}:{node.lineno}: torch.load outside safe_torch_load"
            assert "weights_only" in kw and ast.literal_eval(kw["weights_only"]) is True, \
                f"{path}:{node.lineno}: torch.load without weights_only=True"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "pickle":
            pytest.fail(f"{path}:{node.lineno}: from pickle import ...")
        if isinstance(node, ast.Import) and any(a.name == "pickle" for a in node.names):
            # only to catch torch's UnpicklingError in the guarded loader
            assert path == GUARDED_LOADER, f"{path}:{node.lineno}: import pickle"


def test_the_reward_server_binds_loopback_by_default_and_needs_a_token_elsewhere():
    from margrpo.rewards.remote.server import RewardServer

    assert inspect.signature(RewardServer.__init__).parameters["host"].default == "127.0.0.1"
    with pytest.raises(ValueError, match="token"):
        RewardServer({"random": lambda *a, **k: None}, host="0.0.0.0")
