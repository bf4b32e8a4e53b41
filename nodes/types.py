"""The SafeDIG socket type shared by the nodes."""

from comfy_api.v0_0_2 import io

# A safedig_core.SteeringDictionary: one pack with one domain's decoders.
SafeDIGDict = io.Custom("SAFEDIG_DICT")
