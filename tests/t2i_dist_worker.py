"""torchrun worker of test_t2i_dist.py: run train_t2i.main, then save what this rank's last checkpoint held
(DDP: every rank's own weights; FSDP: the full weights gathered on rank 0) to OUT/rank<r>.pt."""

import os
import sys

import torch

import train_t2i
from support import sd

if __name__ == "__main__":
    torch.set_num_threads(1)
    seen, gather = {}, sd.trainable_state

    def recorded(nets, fsdp):
        seen["state"] = gather(nets, fsdp)
        return seen["state"]

    sd.trainable_state = recorded
    out, argv = sys.argv[1], sys.argv[2:]
    train_t2i.main(argv)
    torch.save(seen["state"], os.path.join(out, f"rank{os.environ['RANK']}.pt"))
