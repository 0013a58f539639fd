"""Two CPU processes (gloo) train the tiny model under torchrun and under ``accelerate launch``: both
ranks must end with identical weights although each saw different examples, so gradients really
were all-reduced.

Run as a script (``torchrun --nproc_per_node 2 tests/test_ddp.py OUT``) this file is the worker.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from livr_model.app import checkpoints as ckpt
from test_train import NUM_TRAIN

WORLD_SIZE = 2
TIMEOUT_S = 300


def _worker(out_dir: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_config, tiny_data, tiny_setup

    import livr_model.app.train as train_module
    from livr_model.app.state import trainable_state_dict
    from livr_model.app.train import train

    torch.set_num_threads(1)
    seen = []
    original = train_module.EncodedCache.__getitem__

    def recording_getitem(self, index):
        seen.append(index)
        return original(self, index)

    train_module.EncodedCache.__getitem__ = recording_getitem
    model, processor = tiny_setup()
    initial = trainable_state_dict(model)
    train_examples, val_examples = tiny_data()
    result = train(tiny_config(out_dir / "run"), model=model, processor=processor,
                   train_examples=train_examples, val_examples=val_examples)
    rank = result.accelerator.process_index
    torch.save({"weights": trainable_state_dict(result.model), "seen": seen, "world": result.accelerator.num_processes,
                "initial_keys": sorted(initial)}, out_dir / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(launcher: str, out_dir: Path) -> list:
    port = f"{_free_port()}"
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}", "--master_addr=127.0.0.1",
                f"--master_port={port}", __file__, str(out_dir)]
    # accelerate's multi-process launcher; on a CPU-only machine the trainer joins a gloo group.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={WORLD_SIZE}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}",
            __file__, str(out_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_ddp_ranks_end_identical(tmp_path, launcher):
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(_launch_command(launcher, tmp_path), env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{launcher} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    assert all(r["world"] == WORLD_SIZE for r in ranks)
    per_epoch = NUM_TRAIN // WORLD_SIZE
    first_epoch = [set(r["seen"][:per_epoch]) for r in ranks]
    assert first_epoch[0].isdisjoint(first_epoch[1]), "each rank must train on its own shard of an epoch"
    assert first_epoch[0] | first_epoch[1] == set(range(NUM_TRAIN))
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys() and any("lora" in k for k in w0) and any("latent" in k for k in w0)
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"{name} differs between ranks"
    assert any(w0[n].abs().sum() > 0 for n in w0 if "lora_B" in n), "training must have moved the weights"
    latest = ckpt.read_pointer(tmp_path / "run", ckpt.LATEST_POINTER)
    assert sorted(p.name for p in latest.glob("rng_state_rank*.pt")) == [f"rng_state_rank{r}.pt" for r in range(WORLD_SIZE)]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
