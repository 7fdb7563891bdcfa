"""Run by test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU) or alone.

Scores the same tiny model on the same samples with sensitivity and GPS and (rank 0) saves
both ScoreMaps to the folder given as argv[1].
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import jitter_view, tensor_data, tiny_vit  # noqa: E402

from sensitune.scoring import score  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
    # drop-path on: the per-batch seeds must make it independent of the process count
    model, data = tiny_vit(drop_path_rate=0.2), tensor_data(10)
    results = {
        # 5 batches: rank 0 gets batches 0, 2, 4 and rank 1 gets 1, 3 (uneven on purpose)
        "sensitivity": score(model, data, "sensitivity", batch_size=2, batches=5),
        "gps": score(model, data, "gps", batch_size=2, view_transform=jitter_view),
    }
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        for name, scores in results.items():
            scores.save(os.path.join(out, f"{name}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
