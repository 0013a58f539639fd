"""Two CPU processes (gloo) train the tiny model under FSDP through ``accelerate launch``: a run is
killed (SIGKILL) after a checkpoint, resumed, and must end where an uninterrupted FSDP run ends
(bit for bit, validation history included) and where a single process with the same global batch
ends (float tolerance; the same validation accuracies).

accelerate enables FSDP only for accelerator devices (CUDA, XPU, ...): on a CPU-only machine
``Accelerator(cpu=True)`` makes a gloo MULTI_CPU (DDP) group and drops the FSDP plugin. The worker
therefore builds the plugin from the launcher's FSDP settings and sets the state to FSDP itself,
so ``accelerator.prepare`` shards the model with FSDP2 on CPU exactly as it would on GPUs.

Run as a script (``accelerate launch ... tests/test_fsdp.py OUT KILL_AT``) this file is the worker.
"""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD_SIZE = 2
TIMEOUT_S = 300
PER_RANK_BATCH = 1
# 8 examples, 2 ranks x 1: 4 steps per epoch, 8 in all; killed after step 6, checkpointed every step.
KILL_AT = 6
# Single process vs FSDP: each trainable tensor within this fraction of its norm. Not per element:
# Adam divides by sqrt(v), so an element whose gradient is float noise moves by +-lr either way
# (measured, 8 steps at lr 1e-2: elements up to 4.1e-3 apart, tensors at most 0.36% of their norm;
# a rank whose gradients were not reduced would be tens of percent off).
WEIGHT_REL_TOL = 2e-2
FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: 'no'
num_machines: 1
num_processes: {world}
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Qwen2_5_VLDecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_reshard_after_forward: true
"""


def run_config(out_dir: Path, batch_size: int, **overrides):
    from test_train import tiny_config

    # No LoRA dropout: its masks are drawn per process, so a single process would draw different ones.
    settings = dict(batch_size=batch_size, grad_accum=1, lora_dropout=0.0, stage_epochs=(1, 1), save_steps=1,
                    keep_checkpoints=8)
    settings.update(overrides)
    return tiny_config(out_dir, **settings)


def _fsdp_accelerator(cfg):
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin()  # the launcher's fsdp_config, from its environment
    accelerator = Accelerator(cpu=True)
    # Both singletons: every AcceleratorState() call copies the process state's fields back in.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


def _worker(out_dir: Path, kill_at: int, resume: bool) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_data, tiny_setup

    import livr_model.app.train as train_module
    from livr_model.app.state import is_fsdp

    torch.set_num_threads(1)
    train_module._make_accelerator = _fsdp_accelerator
    model, processor = tiny_setup()

    def maybe_die(info):
        if info.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    result = train_module.train(run_config(out_dir, PER_RANK_BATCH, resume=resume), model=model, processor=processor,
                                train_examples=tiny_data()[0], val_examples=tiny_data()[1], step_callback=maybe_die)
    accelerator = result.accelerator
    assert is_fsdp(accelerator), accelerator.distributed_type
    full = accelerator.get_state_dict(result.model)
    if accelerator.is_main_process:
        names = [n for n, p in result.model.named_parameters() if p.requires_grad]
        torch.save({"weights": {n: full[n].clone() for n in names}, "steps": result.state.global_step,
                    "history": result.state.history,
                    "world": accelerator.num_processes}, out_dir / "final.pt")
    # Both ranks leave together and take the gloo group down first: a rank exiting while the other
    # still saves, with the group alive, aborted at exit ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, out_dir: Path, kill_at: int, resume: bool) -> subprocess.CompletedProcess:
    config = tmp_path / "fsdp_cpu.yaml"
    config.write_text(FSDP_CONFIG.format(world=WORLD_SIZE))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               f"--main_process_port={_free_port()}", __file__, str(out_dir), str(kill_at), str(int(resume))]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.slow
def test_fsdp_kill_and_resume_matches_uninterrupted_and_single_process(tmp_path):
    from test_train import tiny_data, tiny_setup
    from livr_model.app.state import trainable_state_dict
    from livr_model.app.train import train

    whole = tmp_path / "whole"
    proc = _launch(tmp_path, whole, kill_at=-1, resume=False)
    assert proc.returncode == 0, f"FSDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    killed = tmp_path / "killed"
    proc = _launch(tmp_path, killed, kill_at=KILL_AT, resume=False)
    assert proc.returncode != 0 and not (killed / "final.pt").exists(), "the run must have been killed"
    proc = _launch(tmp_path, killed, kill_at=-1, resume=True)
    assert proc.returncode == 0, f"FSDP resume failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "resuming from" in proc.stdout and f"step {KILL_AT - 1}," in proc.stdout, proc.stdout[-2000:]

    want, got = torch.load(whole / "final.pt"), torch.load(killed / "final.pt")
    assert want["world"] == got["world"] == WORLD_SIZE and want["steps"] == got["steps"] == 8
    assert want["weights"].keys() == got["weights"].keys()
    assert any("lora" in k for k in want["weights"]) and any("latent" in k for k in want["weights"])
    for name in want["weights"]:
        assert torch.equal(want["weights"][name], got["weights"][name]), f"{name} differs after kill and resume"
    assert got["history"] == want["history"] and len(want["history"]) == 2

    # One process, the same global batch: the same examples per step, gradients summed in another order.
    model, processor = tiny_setup()
    single_config = run_config(tmp_path / "single", PER_RANK_BATCH * WORLD_SIZE, save_steps=None)
    single = train(single_config, model=model, processor=processor, train_examples=tiny_data()[0],
                   val_examples=tiny_data()[1])
    reference = trainable_state_dict(single.model)
    assert reference.keys() == want["weights"].keys()
    # Validation under FSDP (every process scores every example) agrees with one process.
    assert [h["val_accuracy"] for h in single.state.history] == [h["val_accuracy"] for h in want["history"]]
    for name, value in reference.items():
        assert ((want["weights"][name] - value).norm() / value.norm()).item() < WEIGHT_REL_TOL, name



def test_livr_train_refuses_deepspeed(tmp_path, monkeypatch):
    from accelerate.utils import DistributedType
    import livr_model.app.train as train_module

    class DeepSpeedAccelerator:
        distributed_type = DistributedType.DEEPSPEED

    monkeypatch.setattr(train_module, "_make_accelerator", lambda cfg: DeepSpeedAccelerator())
    with pytest.raises(ValueError, match="livr-train does not run under DeepSpeed.*accelerate_fsdp.yaml"):
        train_module.train(run_config(tmp_path, 1), model=None, processor=None, train_examples=[], val_examples=[])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3])))
    # Leave without C++ static destructors: a gloo thread still joinable at interpreter teardown
    # aborts the process ("terminate called without an active exception") after a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
