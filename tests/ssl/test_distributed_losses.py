"""Under several processes the losses see the global batch: NT-Xent draws negatives from every
process and DINO's centre is the mean over all of them. Two gloo processes against one."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clinadapt.ssl.losses import DINOLoss, nt_xent


def _worker(rank: int, world: int, init: str, tensors: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        b = len(tensors["z_a"]) // world
        part = slice(rank * b, (rank + 1) * b)
        loss = nt_xent(tensors["z_a"][part], tensors["z_b"][part], 0.2)
        dino = DINOLoss(6, center_momentum=0.5)
        dino.update_center(tensors["teacher"][part])
        torch.save({"loss": loss, "center": dino.center}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_compute_the_global_losses(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "z_a": torch.randn(8, 5, generator=g),
        "z_b": torch.randn(8, 5, generator=g),
        "teacher": torch.randn(8, 6, generator=g),
    }
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, tensors, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    # each process scores its own rows; DDP averages the gradients, i.e. the mean of the losses
    whole = nt_xent(tensors["z_a"], tensors["z_b"], 0.2)
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole, atol=1e-6)
    single = DINOLoss(6, center_momentum=0.5)
    single.update_center(tensors["teacher"])
    for r in ranks:
        assert torch.allclose(r["center"], single.center, atol=1e-6)
