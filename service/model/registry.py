"""Model architectures by name: what a model directory's config.json `architecture` field resolves to.

    "token"                     the built-in token model (worldserve.model.world_model.WorldModel), the default
    "denoiser"                  the built-in continuous-latent denoising model (worldserve.model.denoiser)
    "package.module:Class"      a class in the user's own package (importable on the server's Python path)
    "name"                      an entry point of the group `worldserve.models` (a package that registers it)

A model class implements worldserve.model.protocol.WorldModelProtocol, is a torch.nn.Module (its weights are the
directory's model.safetensors, loaded with load_state_dict) and builds from its config with
`Class.from_config(config: dict)` (the whole config.json, `architecture` included).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

BUILTIN = {
    "token": "worldserve.model.world_model:WorldModel",
    "denoiser": "worldserve.model.denoiser:DenoisingWorldModel",
}
ENTRY_POINT_GROUP = "worldserve.models"


class ArchitectureError(ValueError):
    """An architecture name that does not resolve to a usable class; the message says why."""


def resolve(name: str) -> type:
    target = BUILTIN.get(name)
    if target is None and ":" not in name:
        eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not eps:
            raise ArchitectureError(f"unknown architecture {name!r}: not built in ({', '.join(BUILTIN)}), no "
                                    f"'{ENTRY_POINT_GROUP}' entry point of that name, and not 'package.module:Class'")
        try:
            return eps[0].load()
        except Exception as e:
            raise ArchitectureError(f"architecture {name!r}: entry point {eps[0].value} failed to load: {e}") from e
    module, _, attr = (target or name).partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ArchitectureError(f"architecture {name!r}: cannot import module {module!r}: {e}") from e
    cls = getattr(mod, attr, None)
    if cls is None:
        raise ArchitectureError(f"architecture {name!r}: module {module!r} has no attribute {attr!r}")
    if not callable(getattr(cls, "from_config", None)):
        raise ArchitectureError(f"architecture {name!r}: {attr} has no from_config(config: dict) classmethod")
    return cls
