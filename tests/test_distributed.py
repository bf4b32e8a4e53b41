"""Data parallelism over prompts with torch.distributed (gloo, 2 CPU processes, as torchrun would start
them): each rank collects its own shards, then the ranks train one SAE with all-reduced gradients."""

import json
import os
import socket

import torch
import torch.multiprocessing as mp
from planted import tiny_embeddings, tiny_pipeline

from safedig_core.training.collect import ActivationSet, collect, world_prompts
from safedig_core.training.generators import DiffusersGenerator
from safedig_core.training.sae_training import SAEConfig, train_sae

PROMPTS = world_prompts("source", 4, seed=0)  # 24 prompts
CFG = SAEConfig(expansion=4, k=8, epochs=4, batch_size=256, lr=3e-3, checkpoint_every=10)
POS = "single.0.out"


def generator():
    return DiffusersGenerator(tiny_pipeline("flux", seed=3), steps=3, height=64, width=64,
                              embeddings=tiny_embeddings("flux", [p.text for p in PROMPTS]))


def worker(rank: int, world: int, root: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from safedig_core.training import distributed as dist

    info = dist.init_from_env("gloo")
    written = []
    collect(generator(), PROMPTS, f"{root}/collect", capture_steps=[0, 2], shard_size=4, batch_size=4,
            rank=info.rank, world_size=info.world_size, progress=False, on_shard=written.append)
    dist.barrier()
    sae, metrics = train_sae([ActivationSet(f"{root}/collect")], POS, CFG, f"{root}/sae", progress=False)
    torch.save({"written": written, "state": sae.state_dict(), "metrics": metrics}, f"{root}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_share_collection_and_training(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path), free_port()), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # each rank collected its own half of the shards, together all of them
    assert r0["written"] == [0, 2, 4] and r1["written"] == [1, 3, 5]
    aset = ActivationSet(tmp_path / "collect")  # complete: no shard missing
    # ...and they are the shards one process would have written
    collect(generator(), PROMPTS, tmp_path / "single", capture_steps=[0, 2], shard_size=4, batch_size=4,
            progress=False)
    single = ActivationSet(tmp_path / "single")
    for a, b in zip(aset.shards, single.shards, strict=True):
        ta, tb = aset.read(a, [f"act.{POS}", "row.prompt"]), single.read(b, [f"act.{POS}", "row.prompt"])
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # all-reduced gradients keep the replicas identical, and the SAE learned something
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), name
    assert r0["metrics"]["fve"] == r1["metrics"]["fve"] > 0.5
    saved = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert saved["fve"] == r0["metrics"]["fve"] and saved["steps"] == r0["metrics"]["steps"]
