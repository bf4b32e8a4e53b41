"""Training SafeDIG packs (docs/method.md): collect activations from a generator, route positions before
any SAE is trained, train TopK SAEs, pick harmful features and calibrate tau, adapt only the decoders to a
target domain, and export the pack. `training.cli` adds the pipeline's subcommands to `python -m safedig_core`.

    generators.py   prompts -> sampled activations (the bundled model or a diffusers pipeline)
    collect.py      activation sets on disk (shards, prompt records, resumable)
    routing.py      per-position criteria and the routed choice
    sae_training.py TopK SAE training and decoder-only adaptation
    features.py     harmful / anchor features, weights and tau calibration
    pipeline.py     the stages as resumable steps over one run folder, and the pack export
    distributed.py  optional data-parallel SAE training (torch.distributed)
    judged_check.py the judge's verdicts for a pack on the bundled model (the `steer-check` subcommand)
    cli.py          the subcommands
"""
