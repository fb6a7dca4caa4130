"""`neoxlab train` under torchrun in a world of one process that takes itself for many.

neoxlab treats a world of one as a plain run (`World.distributed` is `world_size > 1`), and NCCL
refuses two ranks on one GPU, so on a one-GPU machine its torchrun code would never run. This
launcher says the world is distributed: the process group (NCCL on a GPU, gloo on a CPU), the
DDP or FSDP2 wrapping, every collective and the gathered checkpoint then run for real, on one
rank. bench/gpu_check.py compares such a run with a plain one.

    python -m torch.distributed.run --standalone --nproc_per_node=1 \\
        bench/one_process_world.py [CONFIG ...] [key=value ...] distributed=ddp|fsdp
"""

import sys

from neoxlab import distributed
from neoxlab.cli import main

if __name__ == "__main__":
    distributed.World.distributed = property(lambda self: True)
    raise SystemExit(main(["train", *sys.argv[1:]]))
