"""The network of an nnU-Net v2 configuration, built by nnU-Net's own network package
(``dynamic-network-architectures``) from the plans' ``architecture`` entry, with a fold's weights.

nnU-Net's ``get_network_from_plans`` resolves the class and the ``_kw_requires_import`` arguments with
``pydoc.locate``, which imports whatever module a plans file names. Here a name is resolved only under
:data:`ALLOWED_PREFIXES` (the network package and ``torch.nn``), so a plans file cannot make medseg import
arbitrary code; a class the package does not have is refused in one line. The package is imported on first
use, so ``medseg`` runs without it until an nnU-Net folder is given.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medseg.inference.loading import state_dict_differences
from medseg.io import InputError

#: Where the names of an ``architecture`` entry may point.
ALLOWED_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")
PACKAGE = "dynamic_network_architectures"
INSTALL_HINT = "pip install 'medseg[nnunet]' (dynamic-network-architectures)"


def _import_package() -> Any:
    try:
        return importlib.import_module(PACKAGE)
    except ImportError:
        raise InputError(f"nnU-Net model folders need nnU-Net's network package: {INSTALL_HINT}") from None


def _locate(dotted: str) -> Any:
    """The object ``a.b.c`` names, for names under :data:`ALLOWED_PREFIXES` only; None if absent."""
    if not dotted.startswith(ALLOWED_PREFIXES):
        return None
    module, _, attr = dotted.rpartition(".")
    while module:
        try:
            obj = importlib.import_module(module)
        except ImportError:
            module, _, head = module.rpartition(".")
            attr = f"{head}.{attr}"
            continue
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj
    return None


def _find_class(name: str) -> type | None:
    """A class of the package's ``architectures`` by its bare name (nnU-Net's fallback when a class moved)."""
    package = importlib.import_module(f"{PACKAGE}.architectures")
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # an architecture whose optional dependency (timm) is missing or broken
            continue
        found = getattr(module, name, None)
        if isinstance(found, type) and issubclass(found, nn.Module):
            return found
    return None


def network_class(name: str, where: str) -> type:
    """The ``nn.Module`` class ``network_class_name`` names, from ``dynamic-network-architectures`` only.

    Raises:
        InputError: the package is not installed, or has no such class.
    """
    _import_package()
    found = _locate(name) if name.startswith(PACKAGE + ".") else None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        found = _find_class(name.rsplit(".", 1)[-1])
    if found is None:
        raise InputError(
            f"{where}: architecture class {name!r} is not one dynamic-network-architectures knows"
        )
    return found


def build_network(architecture: Mapping[str, Any], in_channels: int, outputs: int, where: str) -> nn.Module:
    """The network of an ``architecture`` entry (``network_class_name``, ``arch_kwargs``,
    ``_kw_requires_import``) for ``in_channels`` → ``outputs``, without deep supervision (nnU-Net's inference).

    Raises:
        InputError: an unknown class or argument name, or arguments the class refuses.
    """
    name = str(architecture.get("network_class_name", ""))
    cls = network_class(name, where)
    kwargs = dict(architecture.get("arch_kwargs") or {})
    for key in architecture.get("_kw_requires_import") or []:
        value = kwargs.get(key)
        if value is None:
            continue
        obj = _locate(str(value))
        if obj is None:
            raise InputError(f"{where}: arch_kwargs {key} {value!r} is not a torch.nn or {PACKAGE} name")
        kwargs[key] = obj
    kwargs["deep_supervision"] = False
    try:
        return cls(input_channels=in_channels, num_classes=outputs, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise InputError(
            f"{where}: {name.rsplit('.', 1)[-1]} refuses the plans' arch_kwargs ({text})"
        ) from None


def load_weights(network: nn.Module, weights: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    """``network`` with a fold's ``network_weights`` (eval mode).

    Raises:
        InputError: weights that do not fit the network built from the plans (counted, first one named).
    """
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}
    differ = state_dict_differences(weights, network.state_dict())
    if differ:
        count = f"{len(differ)} tensor{'s differ' if len(differ) > 1 else ' differs'}"
        raise InputError(
            f"{where}: weights do not match the network of plans.json: {count}, first {differ[0]}"
        )
    network.load_state_dict(weights)
    return network.eval()
