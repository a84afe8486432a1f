"""Data parallel: two gloo processes on CPU take the same optimizer steps as one process."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlakit.train import ByteTokenizer, TokenDataset, build_token_file
from mlakit.train.data import read_text_files
from mlakit.train.presets import training_config
from mlakit.train.trainer import DistInfo, TrainConfig, Trainer
from tests.train.conftest import write_corpus

SETTINGS = dict(seq_len=32, batch_size=4, max_steps=3, warmup_steps=1, lr=3e-3, eval_interval=0, checkpoint_interval=0)


def _trainer(data: TokenDataset, out: Path, info: DistInfo, micro: int) -> Trainer:
    config = training_config("tiny", "mla", vocab_size=256, max_seq_len=64)
    return Trainer(config, TrainConfig(**SETTINGS, micro_batch_size=micro), data, out, val_data=data, dist_info=info)


def _worker(rank: int, data_path: str, out: str) -> None:
    torch.set_num_threads(1)
    # a FileStore, not a TCPStore hosted by rank 0: with rank 0 serving the store, rank 0's teardown
    # could pull the store from under rank 1's teardown, which aborted rank 1 twice in CI
    # ("terminate called without an active exception"). torchrun hosts the store in its own agent.
    store = dist.FileStore(f"{out}/store", 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        trainer = _trainer(TokenDataset(data_path), Path(out), DistInfo(rank=rank, world_size=2), micro=2)
        result = trainer.train()
        val = trainer.evaluate()
        if rank == 0:
            torch.save({"losses": result.losses, "val": val, "state": trainer.model.state_dict()}, f"{out}/ddp.pt")
        # both ranks leave together: a rank tearing gloo down while the other still works aborted
        # it once in CI ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path: Path) -> None:
    data = build_token_file(read_text_files([write_corpus(tmp_path)]), ByteTokenizer(), tmp_path / "t.bin")
    mp.spawn(_worker, args=(str(data.path), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    # one process, same global batch of 4, as two accumulated micro-batches of 2
    single = _trainer(data, tmp_path / "single", DistInfo(), micro=2)
    result = single.train()
    for (step_a, loss_a), (step_b, loss_b) in zip(result.losses, ddp["losses"], strict=True):
        assert step_a == step_b
        assert abs(loss_a - loss_b) < 1e-5
    assert abs(single.evaluate() - ddp["val"]) < 1e-5
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], p, rtol=1e-4, atol=1e-5, msg=name)
