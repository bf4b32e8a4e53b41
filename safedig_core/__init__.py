"""SafeDIG core: position-routed SAE dictionaries that steer FLUX.1 / SD3 DiTs away from unsafe content.

Imports no ComfyUI module, so tools, tests and the CLI use it alone. Public API:
    resolve(model)                       -> ModelPositions (ids -> modules) for a ComfyUI or diffusers DiT
    load_pack(path) / save_pack(...)     -> DictionaryPack (one validated .safetensors file)
    SteeringDictionary(pack, domain)     -> a pack with one domain's decoders (or ALL_DOMAINS), cast per device/dtype
    SteeringParams(mode=..., ...)        -> what the user sets
    SteeringHooks(model, dictionary, params, ...)  context manager that steers one call
"""

from .errors import ArchitectureError, PackError, SafeDIGError
from .hooks import ALL_DOMAINS, ActivationCapture, SteeringDictionary, SteeringHooks, safedig_hooks
from .pack import DictionaryPack, load_pack, save_pack
from .positions import ARCHITECTURES, ModelPositions, resolve
from .steering_math import ApplyTo, GateKind, GateScope, Mode, SteeringParams

__version__ = "0.1.0"

__all__ = [
    "ALL_DOMAINS",
    "ARCHITECTURES",
    "ActivationCapture",
    "ApplyTo",
    "ArchitectureError",
    "DictionaryPack",
    "GateKind",
    "GateScope",
    "Mode",
    "ModelPositions",
    "PackError",
    "SafeDIGError",
    "SteeringDictionary",
    "SteeringHooks",
    "SteeringParams",
    "__version__",
    "load_pack",
    "resolve",
    "safedig_hooks",
    "save_pack",
]
