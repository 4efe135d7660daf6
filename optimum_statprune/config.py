"""`StatPruneConfig`: every choice a pruning run makes, validated on construction, JSON round-trip."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .methods import all_methods, get_method, method_names
from .methods.base import CHANNEL, HESSIAN, check_bool, check_choice, check_int, check_real, invalid, is_real
from .methods.cvr import ACTIVATION_STATS, WEIGHT_STAT_AXES
from .methods.sparsegpt import ALLOCATIONS as SPARSEGPT_ALLOCATIONS
from .methods.sparsegpt import SWEEPS as SPARSEGPT_SWEEPS
from .tensor_math.patterns import (
    DEFAULT_SPARSITY,
    UNSTRUCTURED,
    PatternError,
    parse_pattern,
    pattern_conflict,
    resolve_sparsity,
    sparsity_problem,
)

CONFIG_NAME = "statprune_config.json"
SCHEMA_VERSION = 1

GROUPS = ("row", "layer")
# Statistics each compensation reads ("ec" works on the weights alone).
COMPENSATION_NEEDS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "ec": frozenset(),
    "ec-activation": frozenset({CHANNEL}),
    "lsq": frozenset({CHANNEL}),
    "bias": frozenset({CHANNEL}),
}
COMPENSATIONS = tuple(COMPENSATION_NEEDS)
SAFETY_SCOPES = ("layer", "block")
# The weight update after the mask ("admm": masked least squares against X^T X, tensor_math/weight_update.py)
# and the statistics each reads.
UPDATE_NEEDS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "admm": frozenset({HESSIAN}),
}
UPDATES = tuple(UPDATE_NEEDS)
EC_STEPS = ("column", "row", "column,row", "row,column")
# The choices of methods' own fields (WEIGHT_STAT_AXES, ACTIVATION_STATS, SPARSEGPT_*) are imported
# above from their methods, and named here because the CLI lists them. METHODS and PRESET_DEFAULTS are
# views of the registry (module __getattr__ below).
__all__ = [
    "ACTIVATION_STATS", "COMPENSATIONS", "CONFIG_NAME", "DEFAULT_SPARSITY", "EC_STEPS", "GENERAL_DEFAULTS", "GROUPS",
    "PRESET_FIELDS", "SAFETY_SCOPES", "SCHEMA_VERSION", "SPARSEGPT_ALLOCATIONS",
    "SPARSEGPT_SWEEPS", "UPDATES", "WEIGHT_STAT_AXES", "StatPruneConfig",
]

# What a preset field left at None means when the method's preset does not set it (methods/*.py hold
# the presets: "cvr" is the paper's formula, i.e. these; "statprune" what the protocol-A sweep chose).
GENERAL_DEFAULTS: dict[str, Any] = {
    "alpha": 1.0,
    "activation_stat": "variance",
    "activation_power": 0.5,
    "weight_stat_axis": "column",
    "compensation": "none",
    "compensation_shrink": 1.0,
    "safety_check": False,
    "safety_scope": "layer",
    "update": "none",
    "update_mask_steps": 0,
}
PRESET_FIELDS = tuple(GENERAL_DEFAULTS)


def __getattr__(name: str) -> Any:
    # The method list and presets live in the registry; these names are views of it, computed on use so
    # that a method registered later is included.
    if name == "METHODS":
        return method_names()
    if name == "PRESET_DEFAULTS":
        return {m.name: dict(m.preset) for m in all_methods()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def option(
    default: Any = MISSING,
    *,
    help: str,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    default_factory: Callable[[], Any] | Any = MISSING,
) -> Any:
    """A config field with its command-line help and choices: the CLI generates every flag from these, so a
    field's documentation lives with the field (``choices`` may be a function, for lists the registry
    fills at run time)."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class StatPruneConfig:
    """What to prune, how, and with which calibration.

    Fields left at ``None`` take the method's defaults (see ``resolved()``), so a saved config
    records what the user asked for and the manifest records what was actually run. Beside an N:M
    pattern, ``sparsity`` must be left at its default (it then means ``1 - N/M``) or equal ``1 - N/M``;
    ``effective_sparsity`` and ``resolved()`` give what runs (tensor_math/patterns.py).
    """

    method: str = option("statprune", help='selection method', choices=method_names)
    sparsity: float = option(DEFAULT_SPARSITY, help="fraction of each targeted linear's weights to prune (unstructured; N:M implies 1-N/M)")
    pattern: str = option("unstructured", help="'unstructured' or N:M such as 2:4 or 4:8 (N kept in every M inputs)")
    group: str = option("row", help="unstructured comparison group: per output 'row' (Wanda's) or the whole 'layer'", choices=GROUPS)
    # CVR: S_ij = |W_ij| * A_j^(activation_power/2) * (sigma^2_W + eps)^(-alpha/2), A = Var(x) or E[x^2];
    # the paper's formula is A = Var(x), activation_power = 1/2. None: the method's preset.
    alpha: float | None = option(None, help='CVR exponent on the weight-group dispersion (0: no dispersion term)')
    eps: float = option(1e-8, help='CVR epsilon added to the weight-group variance')
    weight_stat_axis: str | None = option(None, help="CVR weight-dispersion group: per input 'column' or per output 'row'", choices=WEIGHT_STAT_AXES)
    activation_stat: str | None = option(None, help="CVR activation statistic A in A^(p/2): 'variance' (the paper's) or 'second_moment' (Wanda's)", choices=ACTIVATION_STATS)
    activation_power: float | None = option(None, help="CVR activation power p in A^(p/2) (0.5: the paper's Var(x)^(1/4))")
    ria_power: float = option(0.5, help='RIA activation power a')
    compensation: str | None = option(None, help='correction after the mask is fixed', choices=COMPENSATIONS)
    # a compensated weight is moved only this fraction of the way from the pruned one (1: fully)
    compensation_shrink: float | None = option(None, help="apply this fraction of the compensation's change (1: all of it)")
    safety_check: bool | None = option(None, help="keep a compensation only where it lowers the layer's output error")
    # judge a compensation by each linear's output error ("layer") or by the whole block's ("block")
    safety_scope: str | None = option(None, help="judge a compensation by each linear's output error ('layer') or the whole block's ('block')", choices=SAFETY_SCOPES)
    ec_steps: str = option("column,row", help='energy-compensation steps and their order', choices=EC_STEPS)
    ec_centered: bool = option(True, help='energy compensation on centered (mean-removed) energy')
    ec_clamp: tuple[float, float] = option((1.0, 2.0), help='clamp of the energy-compensation factors')
    add_bias: bool = option(False, help='let bias compensation add a bias to layers that have none')
    sample_tokens: int = option(2048, help='calibration tokens kept per layer for least-squares scales and the safety check')
    # SparseGPT: OBS updates over column blocks, dampening relative to mean(diag(H)); experimental:
    # how an unstructured budget is spread over column blocks, and the per-block sweep (methods/sparsegpt.py)
    sparsegpt_blocksize: int = option(128, help="SparseGPT: columns per OBS block")
    sparsegpt_damp: float = option(0.01, help="SparseGPT: dampening of the Hessian, relative to mean(diag(H))")
    sparsegpt_allocation: str = option("even", help="SparseGPT (experimental): spread an unstructured budget 'even'ly over column blocks or by 'lookahead'", choices=SPARSEGPT_ALLOCATIONS)
    sparsegpt_sweep: str = option("columns", help="SparseGPT (experimental): per-block updates by a column loop ('columns') or one batched solve ('solve', for GPUs)", choices=SPARSEGPT_SWEEPS)
    # Weight update after the mask, whatever method chose it: "admm" reconstructs the surviving weights
    # against X^T X (masked least squares, a ridge toward the dense weight of update_damp x mean(diag)),
    # update_iters ADMM iterations with penalty update_rho; the first update_mask_steps of them re-choose
    # the mask in the method's score (0: the method's mask is held fixed). None: the method's preset.
    update: str | None = option(None, help="weight update after the mask: 'admm' refits the surviving weights against X^T X ('none': off)", choices=UPDATES)
    update_iters: int = option(20, help='ADMM iterations of the weight update')
    update_damp: float = option(0.1, help='weight-update ridge toward the dense weight, relative to mean(diag(X^T X))')
    update_rho: float = option(1.0, help='ADMM penalty of the weight update')
    update_mask_steps: int | None = option(None, help="first iterations of the weight update that re-choose the mask in the method's score (0: fixed mask)")
    # TF32 matmuls in the ADMM iterations on CUDA (the Gram, its inverse and the errors stay fp32)
    update_tf32: bool = option(True, help="TF32 matmuls in the weight update's iterations on CUDA")
    # OWL: per-block sparsity from the share of outlier Wanda scores (> owl_threshold x mean)
    owl: bool = option(False, help="OWL: per-block sparsity from each block's share of outlier weights (unstructured)")
    owl_threshold: float = option(5.0, help="OWL: a score counts as an outlier above this multiple of its layer's mean")
    owl_lambda: float = option(0.08, help="OWL: how far a block's sparsity may move from the target (+/-)")
    nsamples: int = option(128, help='number of calibration windows')
    seqlen: int = option(2048, help="tokens per calibration window (lowered to the model's context length with a warning)")
    seed: int = option(0, help='seed of the calibration window offsets')
    batch_size: int = option(8, help='calibration windows per forward pass')
    sequential: bool = option(False, help='observe each input group after the previous ones are pruned (slower, Wanda-sequential)')
    targets: list[str] | None = option(None, help='prune only modules whose names match one of these regular expressions')
    ignore: list[str] = option(help='never prune modules whose names match one of these regular expressions', default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.ec_clamp, list):
            self.ec_clamp = tuple(self.ec_clamp)
        if isinstance(self.ignore, str):
            self.ignore = [self.ignore]
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """General fields here; every method checks the values of its own fields, and the chosen method
        the rules that hold when it runs (e.g. SparseGPT refuses a compensation)."""
        if not isinstance(self.method, str) or self.method not in method_names():
            invalid("method", self.method, f"choose one of {', '.join(method_names())}")
        self._validate_pattern()
        check_choice(self, "group", GROUPS)
        self._validate_compensation()
        self._validate_update()
        self._validate_owl()
        for name in ("sample_tokens", "nsamples", "seqlen", "batch_size"):
            check_int(self, name)
        check_int(self, "seed", minimum=0)
        check_bool(self, "sequential")
        self._validate_module_patterns()
        if isinstance(self.schema_version, bool) or self.schema_version != SCHEMA_VERSION:
            invalid("schema_version", self.schema_version, f"this version of optimum-statprune reads schema {SCHEMA_VERSION}")
        for method in all_methods():
            method.check_fields(self)
        method = get_method(self.method)
        unknown = set(method.preset) - set(PRESET_FIELDS)
        if unknown:
            raise ValueError(f"method {method.name!r} presets {sorted(unknown)}, which are not preset fields {PRESET_FIELDS}")
        method.validate(self)

    def _validate_pattern(self) -> None:
        try:
            parse_pattern(self.pattern)
        except PatternError as e:
            invalid("pattern", self.pattern, str(e))
        problem = sparsity_problem(self.sparsity) or pattern_conflict(self.sparsity, self.pattern)
        if problem is not None:
            invalid("sparsity", self.sparsity, problem)

    def _validate_compensation(self) -> None:
        check_choice(self, "compensation", COMPENSATIONS, optional=True)
        check_real(self, "compensation_shrink", low=0, high=1, low_open=True, optional=True,
                   allowed="use a fraction in (0, 1]; 1 applies the correction fully")
        check_bool(self, "safety_check", optional=True)
        check_choice(self, "safety_scope", SAFETY_SCOPES, optional=True)
        check_choice(self, "ec_steps", EC_STEPS)
        check_bool(self, "ec_centered")
        check_bool(self, "add_bias")
        clamp = self.ec_clamp
        if not (isinstance(clamp, tuple) and len(clamp) == 2 and all(is_real(v) for v in clamp) and 0 < clamp[0] <= clamp[1]):
            invalid("ec_clamp", clamp, "use a pair (low, high) with 0 < low <= high, e.g. (1.0, 2.0)")

    def _validate_update(self) -> None:
        check_choice(self, "update", UPDATES, optional=True)
        check_int(self, "update_iters")
        check_real(self, "update_damp", low=0, low_open=True,
                   allowed="use a positive ridge relative to mean(diag(X^T X)), e.g. 0.1")
        check_real(self, "update_rho", low=0, low_open=True, allowed="use a positive ADMM penalty, e.g. 1.0")
        if self.update_mask_steps is not None:
            check_int(self, "update_mask_steps", minimum=0)
        check_bool(self, "update_tf32")
        update = self.resolve("update")  # the method is known to be registered by now
        steps = self.resolve("update_mask_steps")
        # a preset's mask steps matter only where its update runs; the user's are checked always
        if steps > self.update_iters and (update != "none" or self.update_mask_steps is not None):
            invalid("update_mask_steps", steps,
                    f"the mask is re-chosen within the update's iterations: use at most update_iters={self.update_iters}")
        if update == "none":
            return
        method = get_method(self.method)
        if method.updates_weights:
            invalid("update", update, f"{method.name} updates the surviving weights itself; use 'none'")
        if self.compensation not in (None, "none"):
            # The update is a least-squares fit of the surviving weights; a compensation rescales them
            # assuming they are the original ones (before it) or would undo the fit (after it).
            invalid("compensation", self.compensation,
                    f"the weight update (update={update!r}) refits the surviving weights itself; use 'none'")

    def _validate_owl(self) -> None:
        check_bool(self, "owl")
        if self.owl and self.pattern != UNSTRUCTURED:
            invalid("owl", self.owl, "OWL allocates unstructured sparsity per block; use pattern='unstructured'")
        check_real(self, "owl_threshold", low=0, low_open=True, allowed="use a positive multiple of the mean score, e.g. 5")
        s = self.effective_sparsity
        check_real(self, "owl_lambda", low=0, high=min(s, 1 - s) if self.owl else 1.0, high_open=True,
                   allowed="use a spread in [0, min(sparsity, 1 - sparsity)), e.g. 0.08")

    def _validate_module_patterns(self) -> None:
        for name in ("targets", "ignore"):
            v = getattr(self, name)
            if v is None and name == "targets":
                continue
            if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
                invalid(name, v, "use a list of module-name patterns (regular expressions)")
            for p in v:
                try:
                    re.compile(p)
                except re.error as e:
                    invalid(name, p, f"not a valid regular expression ({e})")

    # ------------------------------------------------------------------ derived values
    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, else None."""
        return parse_pattern(self.pattern)

    @property
    def effective_sparsity(self) -> float:
        """The fraction pruned: ``sparsity`` for unstructured, ``1 - N/M`` for N:M."""
        return resolve_sparsity(self.sparsity, self.pattern)

    @property
    def statistics(self) -> frozenset[str]:
        """The input statistics a run collects: the method's, and those its compensation and its weight
        update read (a safety check judges on a token subsample, which comes with the channel statistics)."""
        kind = self.resolved_compensation()
        needs = get_method(self.method).needs | COMPENSATION_NEEDS[kind] | UPDATE_NEEDS[self.resolve("update")]
        if kind != "none" and self.resolve("safety_check"):
            needs |= {CHANNEL}
        return needs

    @property
    def needs_activations(self) -> bool:
        """Whether the run needs calibration data: any statistic, or OWL (whose pre-pass ranks blocks by
        their outlier Wanda scores, from the activations, whatever the method)."""
        return bool(self.statistics) or self.owl

    def resolve(self, name: str) -> Any:
        """A preset field's value as run: the user's, else the method's preset, else the general default."""
        value = getattr(self, name)
        if value is not None:
            return value
        if name == "compensation" and self.resolve("update") != "none":
            return "none"  # a preset's compensation gives way to the weight update (the two are exclusive)
        return get_method(self.method).preset.get(name, GENERAL_DEFAULTS[name])

    def resolved_compensation(self) -> str:
        return self.resolve("compensation")

    def resolved(self) -> dict[str, Any]:
        """The config as run: preset defaults and the sparsity filled in."""
        d = self.to_dict()
        d.update({name: self.resolve(name) for name in PRESET_FIELDS})
        d["sparsity"] = self.effective_sparsity
        return d

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ec_clamp"] = list(self.ec_clamp)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StatPruneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"StatPruneConfig has no field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``statprune_config.json`` into ``save_directory`` (atomically)."""
        from .checkpoint.atomic import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        atomic_write_text(path, self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> StatPruneConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}.")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
