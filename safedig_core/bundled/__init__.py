"""The bundled model organism: a procedural concept world, a tiny FLUX-class generator trained on it, a
MiniLM text encoder, and a judge, so SafeDIG's claims can be measured on CPU without downloaded weights.

    world.py        concepts, wordings (training and held-out) and procedural renders
    unseen.py       the unseen-wording prompt set (written by hand, never trained or calibrated on)
    generator.py    the generator: config, build, load, sample, train (weights in assets/)
    text_encoder.py MiniLM prompt embeddings and the prompt cache
    judge.py        the CNN that reads concept, safety and validity from an image
    cli.py          the bundled-model subcommands of `python -m safedig_core`
"""
