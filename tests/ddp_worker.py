"""train.py's training as one rank of a torchrun job that then saves its own weights to OUT_DIR/rank{RANK}.pt, so
that tests/test_distributed.py can check that the ranks end with the same parameters (train.py itself saves rank
0's only). Takes train.py's flags."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

args = train.parse_args()
model = train.train(args)
torch.save(model.state_dict(), Path(args.out_dir) / f"rank{os.environ['RANK']}.pt")
dist.destroy_process_group()
