"""Each pre-flight refusal of lowbit.distributed.validate, with the fix in its message, and that a refused
run stops before any model is loaded."""
import pytest

from lowbit.distributed import validate as V
from lowbit.errors import ConfigError, InputError
from lowbit.recipes.config import load_config

TINY = "configs/tiny/llama-qlora.yaml"


def _cfg(model_dir, tmp_path, *overrides):
    return load_config(TINY, [f"model.path={model_dir}", f"train.output_dir={tmp_path / 'run'}", *overrides])


# -- sharding a uint8 4-bit container ---------------------------------------------------

@pytest.mark.parametrize("env, what", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "2"},
     "DeepSpeed ZeRO-3"),
    ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, "FSDP"),
])
def test_full_sharding_with_uint8_container_is_refused(env, what, tiny_model_dirs, tmp_path):
    cfg = _cfg(tiny_model_dirs("llama"), tmp_path)
    with pytest.raises(ConfigError, match=f"{what} shards parameters.*storage_dtype=bfloat16"):
        V.validate(cfg, env=env, launcher_cmdline=[])
    cfg = _cfg(tiny_model_dirs("llama"), tmp_path, "model.quant.storage_dtype=bfloat16")
    assert V.validate(cfg, env=env, launcher_cmdline=[]).shards_parameters


def test_zero3_stage_read_from_a_deepspeed_json(tmp_path):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "ds.json")}
    with pytest.raises(ConfigError, match="ZeRO-3"):
        V.check_storage_dtype(V.engine_from_env(env), "uint8")


def test_zero2_keeps_whole_params_so_uint8_is_fine():
    V.check_storage_dtype(V.Engine("deepspeed", 2, 2), "uint8")


# -- bitsandbytes optimizers under FSDP --------------------------------------------------

@pytest.mark.parametrize("opt", ["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"])
def test_bnb_paged_or_8bit_optimizer_under_fsdp_is_refused(opt):
    with pytest.raises(ConfigError, match="use train.optimizer=adamw_torch"):
        V.check_optimizer(V.Engine("fsdp", 0, 2), opt)
    V.check_optimizer(V.Engine("ddp", 0, 2), opt)  # fine without FSDP
    V.check_optimizer(V.Engine("fsdp", 0, 2), "adamw_torch")


# -- launches that would silently run N independent jobs ---------------------------------

def test_accelerate_config_with_processes_but_no_distribution_is_refused():
    with pytest.raises(ConfigError, match="distributed_type NO starts one process.*cpu_ddp.yaml"):
        V.check_accelerate_config({"distributed_type": "NO", "num_processes": 2})
    with pytest.raises(ConfigError, match="MULTI_CPU without mpirun_hostfile.*ONE process, not 4"):
        V.check_accelerate_config({"distributed_type": "MULTI_CPU", "num_processes": 4})
    assert V.check_accelerate_config({"distributed_type": "MULTI_GPU", "num_processes": 2, "use_cpu": True}) == 2


def test_launcher_asking_for_two_processes_seen_as_one_is_refused():
    cmd = ["/venv/bin/python", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "train.py", "--config", TINY]
    with pytest.raises(ConfigError, match="asks for 2 processes but this process sees world size 1"):
        V.check_world(V.Engine("none", 0, 1), env={}, launcher_cmdline=cmd)
    V.check_world(V.Engine("ddp", 0, 2), env={}, launcher_cmdline=cmd)  # a real 2-rank job passes
    assert V.requested_processes_from_launcher(["/usr/bin/bash"]) is None


def test_bare_mpirun_copies_are_refused():
    with pytest.raises(ConfigError, match="OMPI_COMM_WORLD_SIZE=4 .*4 independent copies"):
        V.check_world(V.Engine(), env={"OMPI_COMM_WORLD_SIZE": "4"}, launcher_cmdline=[])


def test_expected_world_size_is_enforced():
    with pytest.raises(ConfigError, match="LOWBIT_EXPECT_WORLD_SIZE=2 but this process sees world size 1"):
        V.check_world(V.Engine(), env={"LOWBIT_EXPECT_WORLD_SIZE": "2"}, launcher_cmdline=[])


def test_fsdp_that_accelerate_did_not_apply_is_refused():
    with pytest.raises(ConfigError, match="asks for FSDP but accelerate set up MULTI_CPU.*plain DDP"):
        V.check_engine_applied(V.Engine("fsdp", 0, 2), "DistributedType.MULTI_CPU")
    V.check_engine_applied(V.Engine("fsdp", 0, 2), "DistributedType.FSDP")
    V.check_engine_applied(V.Engine("ddp", 0, 2), "DistributedType.MULTI_CPU")


# -- gradient checkpointing that breaks DDP ----------------------------------------------

def test_reentrant_checkpointing_under_ddp_is_refused():
    from lowbit.testing import make_tiny_model
    model, _ = make_tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    enabled, reentrant = V.gradient_checkpointing_settings(model)
    assert enabled and reentrant is True
    with pytest.raises(ConfigError, match="use_reentrant': False"):
        V.check_ddp_checkpointing(2, enabled, reentrant, find_unused_parameters=True)
    V.check_ddp_checkpointing(1, enabled, reentrant, True)       # one process: nothing to all-reduce
    V.check_ddp_checkpointing(2, enabled, reentrant, False)      # static graph: the documented workaround
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert V.gradient_checkpointing_settings(model) == (True, False)


# -- LoRA targets that match nothing ------------------------------------------------------

@pytest.mark.parametrize("targets, message", [
    ("[q_proj,attn_out]", r"\['attn_out'\] match no Linear layer; choose from: .*q_proj"),
    ("[attention]", r"\['attention'\] match no Linear layer.*or 'all-linear'"),
])
def test_lora_targets_matching_nothing_are_refused(targets, message, tiny_model_dirs, tmp_path):
    cfg = _cfg(tiny_model_dirs("llama"), tmp_path, f"lora.target_modules={targets}")
    with pytest.raises(ConfigError, match=message):
        V.validate(cfg, env={}, launcher_cmdline=[])


# -- refusals happen before any work -------------------------------------------------------

def test_refused_run_loads_nothing(tiny_model_dirs, tmp_path, monkeypatch):
    import lowbit.models
    from lowbit.recipes import run

    def boom(*a, **kw):
        raise AssertionError("the model was loaded before the pre-flight check refused the run")
    monkeypatch.setattr(lowbit.models, "load_model", boom)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="ZeRO-3"):
        run(_cfg(tiny_model_dirs("llama"), tmp_path))


def test_disk_space_check_names_the_numbers(tmp_path):
    with pytest.raises(ConfigError, match=r"has 1\.0 MiB free but this run writes up to 64\.0 MiB"):
        V.check_disk_space(tmp_path, 64 << 20, free_bytes=1 << 20)
    V.check_disk_space(tmp_path, 1 << 10)  # the real free space of tmp covers 1 KiB


def test_unwritable_output_dir_is_refused_before_training(tiny_model_dirs, tmp_path):
    from lowbit.recipes import run
    (tmp_path / "a_file").write_text("x")
    cfg = _cfg(tiny_model_dirs("llama"), tmp_path, f"train.output_dir={tmp_path / 'a_file' / 'run'}")
    with pytest.raises(InputError, match="is not writable"):
        run(cfg)
