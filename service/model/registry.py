"""Model architectures by name: what a model directory's config.json `architecture` field resolves to.

    "token"                     the built-in token model (worldserve.model.world_model.WorldModel), the default
    "denoiser"                  the built-in continuous-latent denoising model (worldserve.model.denoiser)
    "package.module:Class"      a class in the user's own package (importable on the server's Python path)
    "name"                      an entry point of the group `worldserve.models` (a package that registers it)

A model class implements worldserve.model.protocol.WorldModelProtocol, is a torch.nn.Module (its weights are the
directory's model.safetensors, loaded with load_state_dict) and builds from its config with
`Class.from_config(config: dict)` (the whole config.json, `architecture` included).

User code is a trust decision: `package.module:Class` and entry-point architectures import and run code in the
server with its privileges, so `resolve` refuses them unless the caller passes `trust_remote_code=True`
(ModelSettings.trust_remote_code, WORLDSERVE_MODEL__TRUST_REMOTE_CODE); the refusal comes before anything is
imported or any entry point is looked up. The built-in names (and their own `module:Class` targets) always load.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

BUILTIN = {
    "token": "worldserve.model.world_model:WorldModel",
    "denoiser": "worldserve.model.denoiser:DenoisingWorldModel",
}
ENTRY_POINT_GROUP = "worldserve.models"


TRUST_SETTING = "WORLDSERVE_MODEL__TRUST_REMOTE_CODE"


class ArchitectureError(ValueError):
    """An architecture name that does not resolve to a usable class; the message says why."""


class UntrustedCode(ArchitectureError):
    """An architecture naming user code while model.trust_remote_code is off (nothing was imported)."""


def is_builtin(name: str) -> bool:
    return name in BUILTIN or name in BUILTIN.values()


def check_trusted(name: str, trust_remote_code: bool) -> None:
    """Raises UntrustedCode when `name` is user code (not built in) and trust is off; imports nothing."""
    if not isinstance(name, str) or not name:
        raise ArchitectureError(f"architecture must be a non-empty string, got {name!r}")
    if trust_remote_code or is_builtin(name):
        return
    kind = "the class" if ":" in name else f"the '{ENTRY_POINT_GROUP}' entry point"
    raise UntrustedCode(
        f"architecture {name!r} names user code ({kind} {name!r}); loading it imports and runs that code inside "
        f"the server with the server's privileges (its files, keys, network and every other model). Refused: "
        f"model.trust_remote_code is off. Set {TRUST_SETTING}=true only for model directories whose code you "
        f"trust (built-in architectures: {', '.join(BUILTIN)})")


def resolve(name: str, trust_remote_code: bool = False) -> type:
    """The class of architecture `name`; user code (module:Class, entry points) only with trust_remote_code."""
    check_trusted(name, trust_remote_code)
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
