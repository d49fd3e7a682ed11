"""Started by `torchrun` in test_train_loop.test_torchrun_launch_equals_one_process: joins the process group
the way train.py does (thinkrec.train.ddp.init_from_env, from RANK / WORLD_SIZE in the environment),
trains the same tiny stage as the one-process run, and rank 0 saves the trainable parameters."""

import sys

import torch
from safetensors.torch import save_file

from tests.test_train_loop import _cfg, _inputs, _trainable
from tests.train_fixtures import tiny_lm
from thinkrec.train.ddp import init_from_env, shutdown
from thinkrec.train.loop import train_stage


def main(out_path: str) -> None:
    d = init_from_env()
    if d.world != 2:
        raise SystemExit(f"tests/torchrun_worker.py: expected 2 ranks from torchrun, got WORLD_SIZE={d.world}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lm = tiny_lm(layers=2, n_experts=1)
    lm.set_trainable(adapters=[0])
    train_stage(lm, _inputs(n=21, traces=False), _cfg(batch_size=7, accum=1, eval_every=0, epochs=1.0), None,
                d=d, log=lambda *_: None)
    if d.is_main:
        save_file({n: p.contiguous() for n, p in _trainable(lm).items()}, out_path)
    shutdown(d)


if __name__ == "__main__":
    main(sys.argv[1])
