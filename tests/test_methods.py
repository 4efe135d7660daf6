"""The method registry: what each method declares, that a new method is one file (the documented example,
run as written), and that the statistics a run collects are the union of what its steps read."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build, token_ids

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune import methods as registry
from optimum_statprune.methods import (
    CHANNEL,
    HESSIAN,
    LayerPruned,
    Method,
    ScoreMethod,
    UnknownMethodError,
    get_method,
    method_names,
    register,
    unregister,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_builtin_methods_declare_their_statistics_and_presets():
    needs = {m: get_method(m).needs for m in method_names()}
    assert needs == {
        "magnitude": frozenset(), "wanda": {CHANNEL}, "ria": {CHANNEL}, "cvr": {CHANNEL}, "statprune": {CHANNEL},
        "sparsegpt": {HESSIAN}, "quality": {CHANNEL},  # quality's X^T X is its update's (config.statistics)
    }
    assert dict(get_method("statprune").preset) == {
        "alpha": 0.5, "activation_stat": "second_moment", "activation_power": 1.0, "weight_stat_axis": "column",
        "compensation": "ec-activation", "safety_check": True, "safety_scope": "layer",
    }
    assert all(not get_method(m).preset for m in ("magnitude", "wanda", "ria", "cvr", "sparsegpt"))
    assert [m for m in method_names() if get_method(m).updates_weights] == ["sparsegpt"]
    assert isinstance(get_method("wanda"), ScoreMethod) and not isinstance(get_method("sparsegpt"), ScoreMethod)


def test_registry_refuses_what_it_cannot_use():
    with pytest.raises(UnknownMethodError, match="unknown method 'obs'; choose one of magnitude, wanda"):
        get_method("obs")
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (ScoreMethod,), {"name": "wanda"})())
    with pytest.raises(ValueError, match="lower-case"):
        register(type("Upper", (ScoreMethod,), {"name": "Wanda"})())
    with pytest.raises(ValueError, match="unknown statistics"):
        register(type("Odd", (ScoreMethod,), {"name": "odd", "needs": frozenset({"gradients"})})())
    with pytest.raises(TypeError, match="Method instance"):
        register(ScoreMethod)  # the class, not an instance
    assert "odd" not in method_names()


def test_the_engine_holds_no_per_method_branch():
    """No module outside methods/ names a method to decide what to do (the fallback is a registry name)."""
    root = Path(__file__).resolve().parents[1] / "optimum_statprune"
    names = "|".join(m for m in method_names() if m != "magnitude")
    pattern = re.compile(rf"""==\s*["']({names})["']|in\s*\(["']({names})["']""")
    offenders = [
        f"{path.relative_to(root)}:{i}"
        for path in [*root.glob("engine/*.py"), *root.glob("tensor_math/*.py"), root / "config.py"]
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


class _Spy(Method):
    """A method that reads both statistics (as a method plus a Hessian-based update would) and keeps a
    column mask, recording what the engine gave it."""

    name = "spy-both"
    needs = frozenset({CHANNEL, HESSIAN})
    seen: list = []

    def prune_layer(self, weight, stats, config, sparsity, name=""):
        self.seen.append((name, stats.channel.count, stats.hessian.count, stats.channel.sumsq.clone(),
                          stats.hessian.xtx.diagonal().clone()))
        mask = torch.ones_like(weight, dtype=torch.bool)
        mask[:, ::2] = False
        return LayerPruned(weight * mask, mask, {"spy": True})


@pytest.fixture
def spy():
    method = register(_Spy())
    _Spy.seen = []
    yield method
    unregister(method.name)


def test_a_method_needing_both_statistics_gets_both_from_one_pass(spy):
    config = StatPruneConfig(method=spy.name)
    assert config.statistics == {CHANNEL, HESSIAN}
    model = build("llama")
    pruner = StatPruner.from_pretrained(model, config=config, device="cpu")
    ids = token_ids(4, 16)
    pruner.prune(ids, progress=False)
    assert len(_Spy.seen) == 14 and all(r["spy"] and r["method"] == spy.name for r in pruner.report.layers)
    assert [s[0] for s in _Spy.seen] == [r["name"] for r in pruner.report.layers]  # the layer name, for messages
    for _, n_channel, n_hessian, sumsq, xtx_diag in _Spy.seen:
        assert n_channel == n_hessian == ids.numel()
        # the same tokens: sum of squares per channel is the diagonal of X^T X
        torch.testing.assert_close(sumsq, xtx_diag.double(), rtol=1e-5, atol=1e-6)
    assert model.model.layers[0].self_attn.q_proj.weight[:, ::2].eq(0).all()


def test_the_config_accepts_exactly_the_registered_methods(spy):
    assert StatPruneConfig(method=spy.name).method == spy.name
    unregister(spy.name)
    with pytest.raises(ValueError, match="choose one of"):
        StatPruneConfig(method=spy.name)
    register(spy)  # the fixture unregisters it


def _doc_blocks() -> list[str]:
    section = DOC.read_text().split("## How to add a method", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_documented_method_is_one_file_and_its_test_passes(tmp_path, monkeypatch):
    """The example file of docs/architecture.md, dropped into the package's folder (here: a folder added to
    the package's path), is found by the registry's discovery, and the documented test passes."""
    method_file, test_code = _doc_blocks()
    (tmp_path / "colnorm.py").write_text(method_file)
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(tmp_path)])
    try:
        registry._import_method_modules()
        assert method_names()[-1] == "colnorm"
        namespace: dict = {}
        exec(compile(test_code, str(DOC), "exec"), namespace)
        tests = [fn for name, fn in namespace.items() if name.startswith("test_")]
        assert len(tests) == 2
        for fn in tests:
            fn()
        # and it runs with what every method gets: N:M patterns and a compensation
        model = build("llama")
        config = StatPruneConfig(method="colnorm", pattern="2:4", compensation="ec")
        StatPruner.from_pretrained(model, config=config, device="cpu").prune(None, progress=False)
        w = model.model.layers[1].mlp.down_proj.weight
        assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).eq(2).all()
    finally:
        if "colnorm" in method_names():
            unregister("colnorm")
        sys.modules.pop(f"{registry.__name__}.colnorm", None)
