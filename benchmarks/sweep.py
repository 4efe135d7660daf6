"""The protocol-A sweep that chooses the ``statprune`` preset's defaults (docs/method.md, docs/protocols.md).

    python benchmarks/sweep.py --state sweep.json --calibration-tokens calib.safetensors \
        --eval-tokens eval.safetensors                # resumable: finished runs are skipped

Stages, each choosing from the numbers of the ones before:

1. ``explore`` (50% unstructured): the baselines; the CVR score grid (activation statistic x power x
   dispersion exponent alpha); every compensation variant on Wanda's and on the paper's CVR scores,
   with and without the layer- and block-level safety checks; OWL; sequential observation.
2. ``combine`` (50%): the best score crossed with the compensations that helped and with OWL.
3. ``sensitivity`` (50% and 60%): the chosen preset with one parameter changed at a time; a change that
   lowers perplexity at both sparsities and costs no pruning time is adopted (the best such one).
4. ``holdout`` (60%, 4:8, 2:4): the preset (without OWL where the pattern is N:M) against the baselines,
   so the defaults are checked where they were not chosen.

A separate stage, ``update`` (``--stages update``), sweeps the weight update's parameters around the
``quality`` preset's defaults (``update_damp``, ``update_mask_steps``, ``update_iters``, ``update_rho``),
one at a time, at 50% and 60% unstructured, 4:8 and 2:4, beside Wanda and SparseGPT:

    python benchmarks/sweep.py --state update-sweep.json --stages update --calibration-tokens ... --eval-tokens ...

Every run is appended to the ``--state`` JSON as soon as it is measured; the same command continues an
interrupted sweep. The model is loaded once and its dense weights restored before every run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from quality import add_protocol_arguments, load_model, load_tokens, restore

PAPER_CVR = {"method": "cvr", "alpha": 1.0, "activation_stat": "variance", "activation_power": 0.5,
             "weight_stat_axis": "column"}
BASELINES = [{"method": "magnitude"}, {"method": "wanda"}, {"method": "ria"}, {"method": "sparsegpt"}]
COMPENSATIONS = [
    {"compensation": "ec"},
    {"compensation": "ec", "ec_steps": "column"},
    {"compensation": "ec", "ec_steps": "row"},
    {"compensation": "ec", "ec_steps": "row,column"},
    {"compensation": "ec", "ec_centered": False},
    {"compensation": "ec", "ec_clamp": (1.0, 1.5)},
    {"compensation": "ec", "ec_clamp": (0.5, 2.0)},
    {"compensation": "ec-activation"},
    {"compensation": "lsq"},
    {"compensation": "lsq", "compensation_shrink": 0.5},
    {"compensation": "bias", "add_bias": True},
    {"compensation": "bias", "add_bias": True, "compensation_shrink": 0.5},
    {"compensation": "lsq", "safety_check": True},
    {"compensation": "lsq", "safety_check": True, "safety_scope": "block"},
    {"compensation": "ec", "safety_check": True},
    {"compensation": "ec", "safety_check": True, "safety_scope": "block"},
    {"compensation": "bias", "add_bias": True, "safety_check": True, "safety_scope": "block"},
]
OWL = [{"owl": True, "owl_lambda": lam, "owl_threshold": m} for lam, m in ((0.08, 5.0), (0.04, 5.0), (0.08, 3.0), (0.08, 7.0))]
SCORE_FIELDS = ("method", "alpha", "activation_stat", "activation_power", "weight_stat_axis", "ria_power")


def key(overrides: dict, pattern: str, sparsity: float) -> str:
    return json.dumps({"o": overrides, "p": pattern, "s": sparsity}, sort_keys=True)


class Sweep:
    """Runs configs once each (a state file remembers them) on one model whose dense weights are kept."""

    def __init__(self, args):
        self.args = args
        self.state_path = Path(args.state)
        self.rows: list[dict] = json.loads(self.state_path.read_text())["rows"] if self.state_path.exists() else []
        self.done = {
            "dense" if r["stage"] == "dense" else key(r["overrides"], r["pattern"], r["sparsity_target"]): r
            for r in self.rows
        }
        self.model = None

    def _load(self):
        self.model = load_model(self.args).eval().to(self.args.device)
        self.calib, self.evaluation = load_tokens(self.args)
        self.dense = {k: v.clone() for k, v in self.model.state_dict().items()}

    def restore(self) -> None:
        restore(self.model, self.dense)

    def run(self, stage: str, overrides: dict, pattern: str = "unstructured", sparsity: float = 0.5,
            label: str = "") -> dict:
        from optimum_statprune import StatPruneConfig, StatPruner
        from optimum_statprune.evaluate import perplexity

        k = key(overrides, pattern, sparsity)
        if k in self.done:
            return self.done[k]
        if self.model is None:
            self._load()
        self.restore()
        row = {"stage": stage, "label": label, "overrides": overrides, "pattern": pattern, "sparsity_target": sparsity}
        try:
            config = StatPruneConfig(sparsity=sparsity, pattern=pattern, nsamples=self.calib.shape[0],
                                     seqlen=self.calib.shape[1], batch_size=self.args.batch_size, **overrides)
        except ValueError as e:
            row["error"] = str(e)
        else:
            pruner = StatPruner.from_pretrained(self.model, config=config, device=self.args.device)
            t0 = time.perf_counter()
            pruner.prune(self.calib, progress=False)
            row["seconds"] = time.perf_counter() - t0
            layers = pruner.report.layers
            n = sum(r["shape"][0] * r["shape"][1] for r in layers)
            row["sparsity"] = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers) / n
            applied = [r["compensation"].get("applied") for r in layers if r["compensation"]["kind"] != "none"]
            row["compensation_kept"] = f"{sum(bool(a) for a in applied)}/{len(applied)}" if applied else ""
            row["ppl"] = perplexity(self.model, self.evaluation, self.args.batch_size, disable_progress=True)
        self.rows.append(row)
        self.done[k] = row
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": self.rows}, indent=1))
        tmp.replace(self.state_path)
        print(json.dumps(row), flush=True)
        return row

    def dense_ppl(self) -> float:
        from optimum_statprune.evaluate import perplexity

        if "dense" not in self.done:
            if self.model is None:
                self._load()
            self.restore()
            row = {"stage": "dense", "label": "dense", "overrides": {}, "pattern": "-", "sparsity_target": 0.0,
                   "ppl": perplexity(self.model, self.evaluation, self.args.batch_size, disable_progress=True)}
            self.rows.append(row)
            self.done["dense"] = row
        return self.done["dense"]["ppl"]


def ppl(row: dict) -> float:
    return row.get("ppl", math.inf)


def best(rows: list[dict]) -> dict:
    return min(rows, key=ppl)


def explore(s: Sweep) -> dict:
    for b in BASELINES:
        s.run("explore", b, label=b["method"])
    s.run("explore", {"method": "sparsegpt", "group": "layer"}, label="sparsegpt per-layer")
    s.run("explore", {"method": "ria", "ria_power": 1.0}, label="ria power 1")
    scores = []
    for stat in ("variance", "second_moment"):
        for power in (0.5, 1.0):
            for alpha in (0.0, 0.25, 0.5, 1.0):
                o = {"method": "cvr", "alpha": alpha, "activation_stat": stat, "activation_power": power,
                     "weight_stat_axis": "column"}
                scores.append(s.run("explore", o, label="score grid"))
    s.run("explore", {**PAPER_CVR, "weight_stat_axis": "row"}, label="score: row dispersion")
    s.run("explore", {**PAPER_CVR, "alpha": 2.0}, label="score grid")
    s.run("explore", {**PAPER_CVR, "activation_power": 0.25}, label="score grid")
    comps = {}
    for base_name, base in (("wanda", {"method": "wanda"}), ("cvr", PAPER_CVR)):
        for c in COMPENSATIONS:
            comps[(base_name, json.dumps(c, sort_keys=True))] = s.run("explore", {**base, **c}, label=f"{base_name} + compensation")
    owl = [s.run("explore", {"method": "wanda", **o}, label="wanda + OWL") for o in OWL]
    s.run("explore", {"method": "wanda", "sequential": True}, label="wanda sequential")
    s.run("explore", {**PAPER_CVR, "sequential": True}, label="cvr sequential")
    return {"scores": scores, "comps": comps, "owl": owl}


def score_part(o: dict) -> dict:
    return {k: v for k, v in o.items() if k in SCORE_FIELDS}


OWL_MIN_GAIN = 0.02
"""OWL joins the preset only if it lowers perplexity by this much: its dense pre-pass reads and runs
every block a second time, and on a 7B model the run is bound by reading blocks (docs/performance.md)."""


def combine(s: Sweep, ex: dict) -> dict:
    wanda = ppl(s.run("explore", {"method": "wanda"}))
    best_score = score_part(best(ex["scores"])["overrides"])
    score_ppl = ppl(best(ex["scores"]))
    # compensations that beat their own uncompensated base, best first (judged on Wanda's score)
    helped = sorted(
        ((ppl(r), json.loads(c)) for (b, c), r in ex["comps"].items() if b == "wanda" and ppl(r) < wanda),
        key=lambda t: t[0],
    )
    comps = [c for _, c in helped[:3]]
    owl_row = best(ex["owl"])
    owl = {k: v for k, v in owl_row["overrides"].items() if k.startswith("owl")} if ppl(owl_row) < wanda else {}
    candidates = [s.run("combine", best_score, label="best score")] if score_ppl < math.inf else []
    for c in comps:
        candidates.append(s.run("combine", {**best_score, **c}, label="best score + compensation"))
    chosen = best(candidates)
    if owl:
        s.run("combine", {**best_score, **owl}, label="best score + OWL")
        with_owl = s.run("combine", {**chosen["overrides"], **owl}, label="best + OWL")
        if ppl(with_owl) < ppl(chosen) * (1 - OWL_MIN_GAIN):
            chosen = with_owl
    return chosen


def variations(preset: dict) -> list[tuple[str, dict]]:
    """The preset with one parameter changed at a time."""
    out = []
    for alpha in (0.0, 0.25, 0.5, 1.0, 2.0):
        out.append(("alpha", {**preset, "alpha": alpha}))
    for power in (0.25, 0.5, 0.75, 1.0, 1.5):
        out.append(("activation_power", {**preset, "activation_power": power}))
    for stat in ("variance", "second_moment"):
        out.append(("activation_stat", {**preset, "activation_stat": stat}))
    for axis in ("column", "row"):
        out.append(("weight_stat_axis", {**preset, "weight_stat_axis": axis}))
    base = {k: v for k, v in preset.items() if k in SCORE_FIELDS or k.startswith("owl")}
    out.append(("compensation", {**base, "compensation": "none"}))
    for c in COMPENSATIONS[:1] + COMPENSATIONS[7:12]:
        out.append(("compensation", {**base, **c}))
    check = {k: v for k, v in preset.items() if k in ("safety_check", "safety_scope")}
    if check:
        for c in (COMPENSATIONS[7], COMPENSATIONS[8], COMPENSATIONS[10]):
            out.append(("compensation", {**base, **c, **check}))
    if preset.get("compensation") == "ec":
        for steps in ("column", "row", "column,row", "row,column"):
            out.append(("ec_steps", {**preset, "ec_steps": steps}))
        for clamp in ((1.0, 1.5), (1.0, 2.0), (1.0, 4.0), (0.5, 2.0)):
            out.append(("ec_clamp", {**preset, "ec_clamp": clamp}))
        for centered in (True, False):
            out.append(("ec_centered", {**preset, "ec_centered": centered}))
    if preset.get("compensation", "none") != "none":
        comp = {k: v for k, v in preset.items() if k not in ("safety_check", "safety_scope")}
        out.append(("safety_check", {**comp, "safety_check": False}))
        for scope in ("layer", "block"):
            out.append(("safety_check", {**comp, "safety_check": True, "safety_scope": scope}))
        for shrink in (0.25, 0.5, 0.75, 1.0):
            out.append(("compensation_shrink", {**preset, "compensation_shrink": shrink}))
    no_owl = {k: v for k, v in preset.items() if not k.startswith("owl")}
    out.append(("owl", no_owl))
    out.append(("owl", {**no_owl, **OWL[0]}))
    out.append(("sequential", {**preset, "sequential": not preset.get("sequential", False)}))
    return out


def dedupe(items: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    seen, out = set(), []
    for name, o in items:
        k = json.dumps(o, sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append((name, o))
    return out


def sensitivity(s: Sweep, preset: dict, sparsity: float) -> list[dict]:
    rows = []
    for name, o in dedupe([("preset", preset)] + variations(preset)):
        r = s.run("sensitivity", o, sparsity=sparsity, label=name)
        rows.append({**r, "parameter": name})
    return rows


COSTLY = ("sequential", "owl", "safety_scope")
"""Changes that cost pruning time (more forward passes); ``refine`` does not adopt them."""


def refine(preset: dict, sens50: list[dict], sens60: list[dict]) -> tuple[dict, dict]:
    """The one-parameter change that lowers perplexity at both 50% and 60% the most (by the sum of the
    two relative gains) and costs no pruning time, or the preset unchanged."""
    base50 = ppl(next(r for r in sens50 if r["parameter"] == "preset"))
    base60 = ppl(next(r for r in sens60 if r["parameter"] == "preset"))
    at60 = {json.dumps(r["overrides"], sort_keys=True): r for r in sens60}
    best_gain, chosen = 0.0, None
    for r in sens50:
        o = r["overrides"]
        other = at60.get(json.dumps(o, sort_keys=True))
        if r["parameter"] in ("preset", *COSTLY) or other is None or any(o.get(k) for k in COSTLY if k != "safety_scope"):
            continue
        if o.get("safety_scope", "layer") != preset.get("safety_scope", "layer"):
            continue
        g50, g60 = 1 - ppl(r) / base50, 1 - ppl(other) / base60
        if g50 > 0 and g60 > 0 and g50 + g60 > best_gain:
            best_gain, chosen = g50 + g60, r
    return (chosen, chosen["overrides"]) if chosen else (next(r for r in sens50 if r["parameter"] == "preset"), preset)


def holdout(s: Sweep, preset: dict) -> None:
    no_owl = {k: v for k, v in preset.items() if not k.startswith("owl")}
    for pattern, sparsity in (("unstructured", 0.6), ("4:8", 0.5), ("2:4", 0.5)):
        for b in BASELINES:
            s.run("holdout", b, pattern, sparsity, label=b["method"])
        s.run("holdout", PAPER_CVR, pattern, sparsity, label="cvr (paper)")
        s.run("holdout", preset if pattern == "unstructured" else no_owl, pattern, sparsity, label="preset")
        if pattern != "unstructured":
            s.run("holdout", score_part(preset), pattern, sparsity, label="preset score only")
            for c in (COMPENSATIONS[8], COMPENSATIONS[13], COMPENSATIONS[10]):
                s.run("holdout", {**score_part(preset), **c}, pattern, sparsity, label="preset score + compensation")


UPDATE_PRESET = {"method": "quality"}
UPDATE_CASES = (("unstructured", 0.5), ("unstructured", 0.6), ("4:8", 0.5), ("2:4", 0.5))


def update_variations() -> list[tuple[str, dict]]:
    """The quality preset with one weight-update parameter changed at a time (defaults: damp 0.1, 15 of 20
    iterations re-choosing the mask, rho 1)."""
    out = [("update_damp", {**UPDATE_PRESET, "update_damp": d}) for d in (0.02, 0.05, 0.2, 0.5)]
    out += [("update_mask_steps", {**UPDATE_PRESET, "update_mask_steps": k}) for k in (0, 5, 10, 20)]
    # more or fewer iterations, the mask re-chosen in the first three quarters as in the preset
    out += [("update_iters", {**UPDATE_PRESET, "update_iters": n, "update_mask_steps": 3 * n // 4}) for n in (8, 12, 30, 40)]
    out += [("update_rho", {**UPDATE_PRESET, "update_rho": r}) for r in (0.3, 3.0)]
    return out


def update_stage(s: Sweep) -> dict[tuple[str, float], list[dict]]:
    """Every case: the baselines, the preset, and each variation; rows tagged with the changed parameter."""
    out = {}
    for pattern, sparsity in UPDATE_CASES:
        for b in ({"method": "wanda"}, {"method": "sparsegpt"}):
            s.run("update", b, pattern, sparsity, label=b["method"])
        rows = []
        for name, o in [("preset", UPDATE_PRESET), *update_variations()]:
            rows.append({**s.run("update", o, pattern, sparsity, label=name), "parameter": name})
        out[(pattern, sparsity)] = rows
    return out


def sensitivity_table(rows: list[dict], preset_ppl: float) -> list[str]:
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["parameter"] != "preset":
            by.setdefault(r["parameter"], []).append(r)
    lines = ["| parameter | values tried: perplexity | worst / preset |", "|---|---|---|"]
    for name, rs in by.items():
        vals = ", ".join(f"{_changed(r['overrides'], name)}: {ppl(r):.2f}" for r in rs)
        lines.append(f"| {name} | {vals} | {max(ppl(r) for r in rs) / preset_ppl:.3f} |")
    return lines


def _changed(o: dict, name: str) -> str:
    if name == "safety_check":
        return "off" if not o.get("safety_check") else o.get("safety_scope", "layer")
    if name == "compensation":
        extra = []
        if "compensation_shrink" in o:
            extra.append(f"shrink {o['compensation_shrink']}")
        if o.get("safety_check"):
            extra.append(f"{o.get('safety_scope', 'layer')} check")
        return o.get("compensation", "none") + (f" ({', '.join(extra)})" if extra else "")
    if name == "update_iters":
        return f"{o['update_iters']} (mask {o['update_mask_steps']})"
    if name in o:
        return str(o[name])
    if name == "owl":
        return "off" if not o.get("owl") else f"on (λ={o.get('owl_lambda')}, M={o.get('owl_threshold')})"
    return "?"


def describe(o: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in o.items()) or "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", required=True, help="JSON file the runs are appended to (and resumed from)")
    add_protocol_arguments(p)
    p.add_argument("--stages", default="explore,combine,sensitivity,holdout")
    args = p.parse_args()

    s = Sweep(args)
    stages = args.stages.split(",")
    unknown = set(stages) - {"explore", "combine", "sensitivity", "holdout", "update"}
    if unknown:
        p.error(f"unknown stage(s) {', '.join(sorted(unknown))}")
    dense = s.dense_ppl()
    preset_row, sens50, sens60 = None, [], []
    if set(stages) - {"update"}:  # the statprune preset's stages (explore always runs under them)
        ex = explore(s)
        preset_row = combine(s, ex) if "combine" in stages else best(ex["scores"])
        preset = preset_row["overrides"]
        sens50 = sensitivity(s, preset, 0.5) if "sensitivity" in stages else []
        sens60 = sensitivity(s, preset, 0.6) if "sensitivity" in stages else []
        if sens50 and sens60:
            preset_row, preset = refine(preset, sens50, sens60)
        if "holdout" in stages:
            holdout(s, preset)
    updates = update_stage(s) if "update" in stages else {}

    wanda = {r["pattern"] + f"@{r['sparsity_target']}": ppl(r) for r in s.rows if r["overrides"] == {"method": "wanda"}}
    print(f"\ndense perplexity {dense:.3f} (Wanda {wanda.get('unstructured@0.5', math.nan):.3f})")
    if preset_row is not None:
        print(f"chosen preset: {describe(preset)} -> {ppl(preset_row):.3f}")
    print("\n| stage | run | pattern | sparsity | perplexity | vs Wanda | pruning s | compensation kept |")
    print("|---|---|---|---|---|---|---|---|")
    for r in s.rows:
        if r["stage"] == "dense":
            continue
        w = wanda.get(r["pattern"] + f"@{r['sparsity_target']}")
        rel = f"{ppl(r) / w - 1:+.1%}" if w and "ppl" in r else ""
        val = f"{ppl(r):.2f}" if "ppl" in r else f"error: {r.get('error')}"
        print(f"| {r['stage']} | {describe(r['overrides'])} | {r['pattern']} | {r.get('sparsity', 0):.4f} | {val} | "
              f"{rel} | {r.get('seconds', 0):.1f} | {r.get('compensation_kept', '')} |")
    for sparsity, rows in ((0.5, sens50), (0.6, sens60)):
        if rows:
            base = ppl(next(r for r in rows if r["parameter"] == "preset"))
            print(f"\nSensitivity at {sparsity:.0%} unstructured, around the stage-2 preset ({base:.2f}):\n")
            print("\n".join(sensitivity_table(rows, base)))
    for (pattern, sparsity), rows in updates.items():
        base = ppl(next(r for r in rows if r["parameter"] == "preset"))
        print(f"\nWeight update at {pattern} {sparsity:.0%}, around the quality preset ({base:.2f}):\n")
        print("\n".join(sensitivity_table(rows, base)))


if __name__ == "__main__":
    main()
