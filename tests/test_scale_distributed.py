"""Two ranks on the CPU (gloo) through `accelerate launch`: DDP, DeepSpeed ZeRO-2 and ZeRO-3 follow
the same loss trajectory as one process with the same global batch, and each really ran as a
2-rank job of the intended engine (world size and wrapper asserted: a launcher that silently starts
two single jobs fails here). FSDP does not run on a CPU: accelerate keeps a CPU multi-process job as
MULTI_CPU and never turns it into FSDP, so it would silently train as DDP; that is refused.

Tolerance: per-step losses rtol 1e-5 and adapters atol 1e-5 (measured: <= 5e-7; the ranks reduce
the same fp32 gradients in a different order than one process does)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny/llama-qlora.yaml"
COMMON = ["train.max_steps=4", "eval.before=false", "train.report_to=[jsonl]", "lora.dropout=0.0"]
GLOBAL_BATCH = 4


def _env():
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache/lowbit/torch_extensions"))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(accelerate_config, args, timeout=420):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
           "--main_process_port", str(_free_port()), "train.py", "--config", TINY, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env())


def _read(out: Path):
    rows = [json.loads(x) for x in (out / "logs.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    run = json.loads((out / "lowbit_run.json").read_text())
    return losses, load_file(out / "adapter" / "adapter_model.safetensors"), run


@pytest.fixture(scope="module")
def single(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "single"
    p = subprocess.run([sys.executable, "train.py", "--config", TINY, f"model.path={tiny_model_dirs('llama')}",
                        f"train.output_dir={out}", f"train.batch_size={GLOBAL_BATCH}", *COMMON],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    return _read(out)


@pytest.mark.slow
@pytest.mark.parametrize("config, extra, engine, stage, wrapper", [
    ("configs/accelerate/cpu_ddp.yaml", [], "ddp", 0, "DistributedDataParallel"),
    ("configs/accelerate/cpu_zero2.yaml", [], "deepspeed", 2, "DeepSpeedEngine"),
    ("configs/accelerate/cpu_zero3.yaml", ["model.quant.storage_dtype=bfloat16"], "deepspeed", 3, "DeepSpeedEngine"),
], ids=["ddp", "zero2", "zero3"])
def test_two_ranks_match_one_process(config, extra, engine, stage, wrapper, single, tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    p = _launch(config, [f"model.path={tiny_model_dirs('llama')}", f"train.output_dir={out}",
                         f"train.batch_size={GLOBAL_BATCH // 2}", *COMMON, *extra])
    assert p.returncode == 0, p.stderr[-4000:]
    losses, adapters, run = _read(out)
    assert run["world_size"] == 2
    assert run["engine"] == {"name": engine, "zero_stage": stage, "world_size": 2, "wrapper": wrapper}
    ref_losses, ref_adapters, ref_run = single
    assert len(losses) == len(ref_losses) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    assert adapters.keys() == ref_adapters.keys() and len(adapters) > 0
    for k in adapters:
        assert adapters[k].shape == ref_adapters[k].shape, k  # a ZeRO-3 shard saved as the adapter would differ
        torch.testing.assert_close(adapters[k], ref_adapters[k], rtol=0, atol=1e-5)
    # the adapters moved away from init (B = 0), so matching is not trivially true
    assert any(adapters[k].abs().max() > 1e-3 for k in adapters if "lora_B" in k)
    torch.testing.assert_close(run["metrics"]["eval_ppl_after"], ref_run["metrics"]["eval_ppl_after"], rtol=1e-4,
                               atol=0)


@pytest.mark.slow
def test_multi_cpu_without_mpirun_is_refused(tiny_model_dirs, tmp_path):
    """`accelerate launch --num_processes 2` (no --multi_gpu) on a CPU starts ONE process that trains alone."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
           str(_free_port()), "train.py", "--config", TINY, f"model.path={tiny_model_dirs('llama')}",
           f"train.output_dir={tmp_path / 'run'}", *COMMON]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode != 0
    assert "num_processes=2 with distributed_type NO starts one process that trains alone" in p.stderr, \
        p.stderr[-3000:]
    assert "cpu_ddp.yaml" in p.stderr
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
def test_fsdp_on_cpu_is_refused_not_silently_ddp(tiny_model_dirs, tmp_path):
    import yaml
    conf = yaml.safe_load((ROOT / "configs/accelerate/fsdp_qlora.yaml").read_text())
    conf.update(use_cpu=True, main_process_ip="127.0.0.1", fsdp_config={**conf["fsdp_config"],
                                                                       "fsdp_cpu_ram_efficient_loading": False,
                                                                       "fsdp_sync_module_states": False})
    (tmp_path / "fsdp_cpu.yaml").write_text(yaml.safe_dump(conf))
    p = _launch(str(tmp_path / "fsdp_cpu.yaml"), [f"model.path={tiny_model_dirs('llama')}",
                                                  f"train.output_dir={tmp_path / 'run'}", "train.batch_size=2",
                                                  "model.quant.storage_dtype=bfloat16", *COMMON])
    assert p.returncode != 0
    assert "asks for FSDP but accelerate set up MULTI_CPU" in p.stderr and "cpu_ddp.yaml" in p.stderr, \
        p.stderr[-3000:]
    assert not (tmp_path / "run" / "adapter").exists()
