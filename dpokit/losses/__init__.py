"""Preference losses in torchtune's signature: ``forward(policy, reference) -> (losses, chosen_rewards,
rejected_rewards)``, each ``[B]``, over `ChosenRejectedOutputs` (`dpokit.types`).

- `dpokit.losses.objectives`: every built-in objective, one small class each, side by side.
- `dpokit.losses.base`: the base classes (WPO weighting, the SFT term, ``beta``) and parameter checks.
- `dpokit.losses.combined`: weighted sums (``loss.name=[dpo,sft] loss.weights=[1.0,0.5]``).
- `dpokit.losses.ranked`: ranked groups of k completions: pairing rules around any pairwise loss
  (`RankedPairwiseLoss`) and the listwise losses (``forward(policy, reference) -> (losses [G], rewards [C])``).
- `dpokit.losses.unpaired`: unpaired examples (a completion labelled desirable or not): KTO, APO-zero and BCO
  (``forward(policy, reference) -> (losses [N], rewards [N])``, `UnpairedLoss`).

A user's loss is any ``torch.nn.Module`` with the same ``forward``; ``--loss pkg.module:Class`` loads it and
``loss.<param>=value`` sets its constructor arguments. docs/losses.md is the reference table.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from typing import Any, Optional

import torch
from torch import Tensor, nn

from dpokit.errors import DpokitError
from dpokit.losses.base import BetaLoss, PreferenceLoss, check_loss_outputs, check_parameter
from dpokit.losses.combined import CombinedLoss
from dpokit.losses.objectives import (
    AOTLoss,
    AOTPairLoss,
    APODownLoss,
    APOZeroLoss,
    BCOLoss,
    DiscoPOPLoss,
    DPOLoss,
    DPOPLoss,
    EXOLoss,
    IPOLoss,
    LDDPOLoss,
    NCALoss,
    NormalizedDPOLoss,
    ORPOLoss,
    RobustDPOLoss,
    RSOLoss,
    SFTLoss,
    SimPOLoss,
    SPPOHardLoss,
    WPOLoss,
)
from dpokit.losses.ranked import (
    PAIRING_RULES,
    LiPOLambdaLoss,
    ListwiseLoss,
    PlackettLuceLoss,
    RankedPairwiseLoss,
    pairs_of,
    ranked_pairs,
)
from dpokit.losses.unpaired import APOZeroUnpairedLoss, BCOUnpairedLoss, KTOLoss, UnpairedLoss
from dpokit.ranges import AT_LEAST_0
from dpokit.types import ChosenRejectedOutputs, RankedOutputs, UnpairedOutputs

LOSSES: dict[str, type[nn.Module]] = {
    "dpo": DPOLoss,
    "robust": RobustDPOLoss,
    "dpo_norm": NormalizedDPOLoss,
    "ld_dpo": LDDPOLoss,
    "wpo": WPOLoss,
    "dpop": DPOPLoss,
    "rso": RSOLoss,
    "hinge": RSOLoss,
    "ipo": IPOLoss,
    "exo": EXOLoss,
    "nca": NCALoss,
    "bco": BCOLoss,
    "sppo_hard": SPPOHardLoss,
    "aot_pair": AOTPairLoss,
    "aot": AOTLoss,
    "apo_zero": APOZeroLoss,
    "apo_down": APODownLoss,
    "discopop": DiscoPOPLoss,
    "simpo": SimPOLoss,
    "orpo": ORPOLoss,
    "sft": SFTLoss,
    "plackett_luce": PlackettLuceLoss,  # listwise: ranked data only
    "lipo": LiPOLambdaLoss,
    "kto": KTOLoss,  # unpaired: unpaired data only
    "apo_zero_unpaired": APOZeroUnpairedLoss,
    "bco_unpaired": BCOUnpairedLoss,
}
SHAPES = ("pairs", "ranked", "unpaired")  # the prepared data's shapes (`dpokit.data.prepared`)
RANKED_KEYS = ("pairs", "gap_weighted")  # loss keys for pairwise losses on ranked data


def loss_class(name: str) -> type[nn.Module]:
    """A registered loss name, or ``package.module:Class`` for a user's own loss."""
    if name in LOSSES:
        return LOSSES[name]
    if ":" not in name:
        raise DpokitError(
            f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))} or give package.module:Class"
        )
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise DpokitError(f"loss {name!r}: give both the module and the class, as package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DpokitError(f"loss {name!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise DpokitError(f"loss {name!r}: module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise DpokitError(f"loss {name!r} must be a torch.nn.Module subclass with forward(policy, reference)")
    return cls


def loss_parameter_types(cls: type) -> dict[str, Any]:
    """Every constructor parameter a loss accepts, by name, with its annotated type (``float``, ``bool``, ``str``,
    ``Optional[...]``; `typing.Any` where a user's loss gives none): the class's own ``__init__`` first, then, while
    an ``__init__`` passes ``**kwargs`` on, its base's (a built-in loss's ``**common``: ``beta``, ``sft_weight``,
    ``wpo``). A parameter a subclass declares again keeps the subclass's type."""
    types: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        init = vars(klass).get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # a user's annotation that does not resolve (a name imported only for type checking)
            hints = {}
        for p in parameters:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                types.setdefault(p.name, hints.get(p.name, Any))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return types


def loss_parameters(cls: type) -> list[str]:
    """Names of the constructor parameters a loss accepts (`loss_parameter_types`' order)."""
    return list(loss_parameter_types(cls))


def is_listwise(loss: nn.Module | type) -> bool:
    """A loss (or loss class) that scores whole ranked groups: ``forward(RankedOutputs, ...) -> (losses [G],
    rewards [C])``."""
    return bool(getattr(loss, "is_listwise", False))


def is_unpaired(loss: nn.Module | type) -> bool:
    """A loss (or loss class) for unpaired data: ``forward(groups of [completion, kl_completion], ...) -> (losses
    [N], rewards [N])`` (`UnpairedLoss`)."""
    return bool(getattr(loss, "is_unpaired", False))


UNPAIRED_LOSSES = tuple(name for name, cls in LOSSES.items() if is_unpaired(cls))


def build_loss(spec: dict[str, Any], shape: Optional[str] = "pairs") -> nn.Module:
    """Build a loss from the config's ``loss`` section: ``name`` (one, or a list with ``weights``) plus
    constructor parameters. For a list, each parameter goes to every term that takes it.

    `shape` is the prepared data's (`SHAPES`). ``ranked``: a listwise loss is returned as is, a pairwise one (or a
    weighted list) wrapped in `RankedPairwiseLoss` with ``loss.pairs`` (default all) and ``loss.gap_weighted``
    (default false). ``pairs``: those keys, listwise and unpaired losses are errors. ``unpaired``: only an unpaired
    loss (`is_unpaired`). None: the data is not known yet (a config being checked): every key is checked, and the
    loss comes back as ranked data would get it when the section asks for ranked-only things, else as is."""
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"build_loss: shape {shape!r} is not one of {SHAPES}")
    spec = dict(spec)
    ranked_keys = {key: spec.pop(key) for key in RANKED_KEYS if key in spec}
    loss = _build_named(spec)
    name = spec.get("name")
    listwise, unpaired = is_listwise(loss), is_unpaired(loss)
    if (listwise or unpaired) and ranked_keys:
        key = next(iter(ranked_keys))
        kind = "listwise and scores every completion of a group at once" if listwise else "for unpaired data"
        raise DpokitError(
            f"loss.{key} applies to pairwise losses on ranked data; loss {name!r} is {kind}: remove loss.{key}"
        )
    if shape == "unpaired" and not unpaired:
        raise DpokitError(
            f"loss {name!r} needs {'ranked groups' if listwise else 'pairs'}; this data is unpaired (one completion "
            f"and a desirable/undesirable label per prompt): choose an unpaired loss ({', '.join(UNPAIRED_LOSSES)})"
        )
    if unpaired:
        if shape in ("pairs", "ranked"):
            raise DpokitError(
                f"loss {name!r} is for unpaired data (prepared from prompt, completion, label rows); this data is "
                f"{shape}: choose a {'pairwise' if shape == 'pairs' else 'pairwise or listwise'} loss such as dpo"
            )
        return loss
    if shape == "pairs":
        if listwise:
            raise DpokitError(
                f"loss {name!r} is listwise: it needs ranked data (prepared from k completions per "
                "prompt); this data is pairs: choose a pairwise loss such as dpo"
            )
        if ranked_keys:
            key = next(iter(ranked_keys))
            raise DpokitError(
                f"loss.{key} applies to ranked data (prepared from k completions per prompt); this data is pairs: "
                "remove it"
            )
        return loss
    if listwise or (shape is None and not ranked_keys):
        return loss
    return RankedPairwiseLoss(loss, **ranked_keys)


def _build_named(spec: dict[str, Any]) -> nn.Module:
    """`build_loss` without the ranked-data wrapping: one loss, or a weighted list of them."""
    spec = dict(spec)
    name = spec.pop("name", "dpo")
    weights = spec.pop("weights", None)
    if isinstance(name, str) and "," in name and ":" not in name:  # --loss dpo,sft
        name = [part.strip() for part in name.split(",") if part.strip()]
    if isinstance(weights, str):  # loss.weights=1.0,0.5
        try:
            weights = [float(part) for part in weights.split(",")]
        except ValueError as exc:
            raise DpokitError(f"loss.weights={weights!r}: give numbers, e.g. loss.weights=1.0,0.5") from exc
    if not isinstance(name, (list, tuple)):
        if weights is not None:
            raise DpokitError(f"loss.weights is for a list of losses (loss.name=[dpo,sft]); loss.name is {name!r}")
        return _build_one(str(name), spec)
    names = [str(n) for n in name]
    if not names or len(set(names)) != len(names):
        raise DpokitError(f"loss.name={names!r}: give one or more different losses, e.g. [dpo, sft]")
    listwise = [n for n in names if is_listwise(loss_class(n))]
    if listwise:
        raise DpokitError(
            f"loss.name={names!r}: {listwise[0]} is listwise (one loss per group, not per pair) and does not combine "
            f"in a weighted list; use it alone (loss.name={listwise[0]})"
        )
    unpaired = [n for n in names if is_unpaired(loss_class(n))]
    if unpaired:
        raise DpokitError(
            f"loss.name={names!r}: {unpaired[0]} is for unpaired data (one loss per example, not per pair) and does "
            f"not combine in a weighted list; use it alone (loss.name={unpaired[0]})"
        )
    weights = [1.0] * len(names) if weights is None else weights
    if not isinstance(weights, (list, tuple)) or len(weights) != len(names):
        raise DpokitError(f"loss.weights must list one number per loss in loss.name ({len(names)}), got {weights!r}")
    weights = [check_parameter(f"weights[{i}]", w, AT_LEAST_0) for i, w in enumerate(weights)]
    accepted = {n: loss_parameters(loss_class(n)) for n in names}
    unused = [key for key in spec if not any(key in params for params in accepted.values())]
    if unused:
        listed = "; ".join(f"{n}: {', '.join(p) or 'none'}" for n, p in accepted.items())
        raise DpokitError(f"no loss in {names} has the parameter {', '.join(unused)}; their parameters: {listed}")
    terms = {n: _build_one(n, {k: v for k, v in spec.items() if k in accepted[n]}) for n in names}
    return CombinedLoss(terms, weights)


def _build_one(name: str, params: dict[str, Any]) -> nn.Module:
    cls = loss_class(name)
    valid = loss_parameters(cls)
    unknown = [key for key in params if key not in valid]
    if unknown:
        listed = ", ".join(f"loss.{p}" for p in valid) or "none"
        raise DpokitError(f"loss {name!r} has no parameter {', '.join(unknown)}; its parameters: {listed}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise DpokitError(f"loss {name!r}: {exc}") from exc


def is_reference_free(loss: nn.Module) -> bool:
    return bool(getattr(loss, "is_reference_free", False))


def check_ranked_loss_outputs(
    loss: nn.Module, outputs: Any, num_groups: int, num_completions: int
) -> tuple[Tensor, Tensor]:
    """What a loss on ranked data returned, checked: two float tensors, losses ``[G]`` (one per group) and
    rewards ``[C]`` (one per completion, NaN allowed for a completion no pair uses)."""
    expected = (
        f"(losses, rewards): losses of shape [{num_groups}] (one per group), rewards of shape [{num_completions}] "
        "(one per completion)"
    )
    return _check_two_outputs(loss, outputs, [(num_groups,), (num_completions,)], "ranked", expected, "per-group")


def check_unpaired_loss_outputs(loss: nn.Module, outputs: Any, num_examples: int) -> tuple[Tensor, Tensor]:
    """What a loss on unpaired data returned, checked: two float tensors, losses and rewards ``[N]`` (one each per
    example)."""
    expected = f"(losses, rewards) of shape [{num_examples}] each (one per example)"
    return _check_two_outputs(loss, outputs, [(num_examples,)] * 2, "unpaired", expected, "per-example")


def _check_two_outputs(
    loss: nn.Module, outputs: Any, shapes_wanted: list[tuple[int]], data: str, expected: str, per: str
) -> tuple[Tensor, Tensor]:
    """`outputs` as ``(losses, rewards)`` of `shapes_wanted`, both float, or an error naming the loss, what it
    returned on `data` data, and what it must return (`expected`)."""
    name = type(loss).__name__
    if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2):
        got = f"{len(outputs)} values" if isinstance(outputs, (tuple, list)) else type(outputs).__name__
        raise DpokitError(f"loss {name} returned {got} on {data} data; its forward must return {expected}")
    shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in outputs]
    if shapes != shapes_wanted:
        raise DpokitError(
            f"loss {name} returned shapes {shapes[0]}, {shapes[1]} on {data} data; it must return {expected} "
            f"({per} losses, not their mean: the recipe averages)"
        )
    if not all(v.is_floating_point() for v in outputs):
        raise DpokitError(f"loss {name} returned dtypes {outputs[0].dtype}, {outputs[1].dtype}; both must be floats")
    return outputs[0], outputs[1]


__all__ = [
    "LOSSES",
    "PAIRING_RULES",
    "BetaLoss",
    "ChosenRejectedOutputs",
    "CombinedLoss",
    "ListwiseLoss",
    "PreferenceLoss",
    "RankedOutputs",
    "RankedPairwiseLoss",
    "SHAPES",
    "UNPAIRED_LOSSES",
    "UnpairedLoss",
    "UnpairedOutputs",
    "build_loss",
    "check_loss_outputs",
    "check_ranked_loss_outputs",
    "check_unpaired_loss_outputs",
    "is_listwise",
    "is_unpaired",
    "is_reference_free",
    "loss_class",
    "loss_parameter_types",
    "loss_parameters",
    "pairs_of",
    "ranked_pairs",
    *sorted(cls.__name__ for cls in set(LOSSES.values())),
]
