"""The SafeDIG socket type shared by the nodes."""

from .compat import io

# A safedig_core.SteeringDictionary: one pack with one domain's decoders.
SafeDIGDict = io.Custom("SAFEDIG_DICT")
