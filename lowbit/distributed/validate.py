"""Refuse known-bad scale-out combinations before any work starts, naming the fix.

`validate(cfg)` runs at the top of a training run (every rank); `validate_training(...)`
runs once the model and TrainingArguments exist. Each check is also a plain function of
its inputs so it can be tested without launching anything.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import ConfigError
from lowbit.models.load import _read_config
from lowbit.modules.lora import resolve_target_modules

FULL_SHARDING = "FSDP or DeepSpeed ZeRO-3"
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass
class Engine:
    """What the launcher set up for this process."""
    name: str = "none"          # none | ddp | fsdp | deepspeed
    zero_stage: int = 0
    world_size: int = 1

    @property
    def shards_parameters(self) -> bool:
        return self.name == "fsdp" or (self.name == "deepspeed" and self.zero_stage == 3)


def _true(v) -> bool:
    return str(v).lower() in ("1", "true", "yes")


def _zero_stage_from_file(path: str) -> int:
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"DeepSpeed config {path} cannot be read ({e}); fix deepspeed_config_file") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else 0


def engine_from_env(env=None, state=None) -> Engine:
    """Engine from `accelerate launch`'s environment (or an accelerate state, when given)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if state is not None:
        world = int(getattr(state, "num_processes", world))
        dt = str(getattr(state, "distributed_type", "")).rsplit(".", 1)[-1]
        if dt == "FSDP":
            return Engine("fsdp", 0, world)
        if dt == "DEEPSPEED":
            plugin = getattr(state, "deepspeed_plugin", None)
            return Engine("deepspeed", int(getattr(plugin, "zero_stage", 0) or 0), world)
    if _true(env.get("ACCELERATE_USE_FSDP", "")):
        return Engine("fsdp", 0, world)
    if _true(env.get("ACCELERATE_USE_DEEPSPEED", "")):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            stage = _zero_stage_from_file(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
        return Engine("deepspeed", int(stage or 0), world)
    return Engine("ddp" if world > 1 else "none", 0, world)


# -- individual checks ------------------------------------------------------------------

def check_storage_dtype(engine: Engine, storage_dtype: str, load_in_4bit: bool = True) -> None:
    if load_in_4bit and engine.shards_parameters and storage_dtype == "uint8":
        what = "FSDP" if engine.name == "fsdp" else "DeepSpeed ZeRO-3"
        raise ConfigError(f"{what} shards parameters as flat float tensors and cannot shard the 4-bit base held in "
                          "uint8; set model.quant.storage_dtype=bfloat16 (the same packed bytes in a bfloat16 "
                          "container, what FSDP-QLoRA does)")


def check_optimizer(engine: Engine, optimizer: str) -> None:
    if engine.name == "fsdp" and (optimizer.startswith("paged_") or "8bit" in optimizer):
        raise ConfigError(f"train.optimizer={optimizer} (bitsandbytes paged/8-bit state) does not work with FSDP's "
                          "sharded flat parameters; use train.optimizer=adamw_torch (FSDP already shards its state "
                          "across ranks)")


def check_accelerate_config(conf: dict, where: str = "accelerate config") -> int:
    """Static checks of an accelerate config mapping → the number of processes it starts."""
    n = int(conf.get("num_processes") or 1)
    dt = str(conf.get("distributed_type", "NO")).upper()
    machines = int(conf.get("num_machines") or 1)
    if n > 1 and dt == "NO":
        raise ConfigError(f"{where}: num_processes={n} with distributed_type NO starts one process that trains "
                          "alone; set distributed_type: MULTI_GPU (with use_cpu: true on a CPU), see "
                          "configs/accelerate/ddp.yaml or cpu_ddp.yaml")
    if dt == "MULTI_CPU" and n > 1 and not conf.get("mpirun_hostfile"):
        raise ConfigError(f"{where}: distributed_type MULTI_CPU without mpirun_hostfile makes `accelerate launch` "
                          f"start ONE process, not {n}; for gloo DDP on CPU use distributed_type: MULTI_GPU with "
                          "use_cpu: true (configs/accelerate/cpu_ddp.yaml)")
    if machines > 1 and n % machines:
        raise ConfigError(f"{where}: num_processes={n} is not a multiple of num_machines={machines}")
    return n


def requested_processes_from_launcher(cmdline: list[str] | None) -> tuple[int, str] | None:
    """(processes, description) that an `accelerate launch` command line asked for, or None."""
    if not cmdline:
        return None
    args = None
    for i, a in enumerate(cmdline):
        name = os.path.basename(a)
        if a == "accelerate.commands.launch" or (name in ("accelerate", "accelerate-launch")
                                                   and i + 1 < len(cmdline) and cmdline[i + 1] == "launch"):
            args = cmdline[i + 1:] if a == "accelerate.commands.launch" else cmdline[i + 2:]
            break
        if name == "accelerate-launch":
            args = cmdline[i + 1:]
            break
    if args is None:
        return None
    from accelerate.commands.launch import launch_command_parser
    try:
        ns, _ = launch_command_parser().parse_known_args(args)
    except SystemExit:
        return None
    conf_file = ns.config_file
    if conf_file is None:
        from accelerate.commands.config import default_config_file
        conf_file = default_config_file if os.path.isfile(default_config_file) else None
    conf = {}
    if conf_file:
        import yaml
        try:
            conf = yaml.safe_load(Path(conf_file).read_text()) or {}
        except (OSError, yaml.YAMLError):
            conf = {}
    if ns.num_processes is not None:
        conf["num_processes"] = ns.num_processes
    if ns.multi_gpu:
        conf["distributed_type"] = "MULTI_GPU"
    if ns.use_deepspeed:
        conf["distributed_type"] = "DEEPSPEED"
    if ns.use_fsdp:
        conf["distributed_type"] = "FSDP"
    where = f"accelerate config {conf_file}" if conf_file else "accelerate launch flags"
    return check_accelerate_config(conf, where), where


def _parent_cmdline() -> list[str] | None:
    try:
        import psutil
        parent = psutil.Process().parent()
        return parent.cmdline() if parent is not None else None
    except Exception:  # psutil missing or no access: nothing to check against
        return None


def check_world(engine: Engine, env=None, launcher_cmdline: list[str] | None = None) -> None:
    """Refuse N processes that each believe they are alone (N copies of the same job)."""
    env = os.environ if env is None else env
    world = engine.world_size
    expect = env.get("LOWBIT_EXPECT_WORLD_SIZE")
    if expect and int(expect) != world:
        raise ConfigError(f"LOWBIT_EXPECT_WORLD_SIZE={expect} but this process sees world size {world}; the launcher "
                          "did not start one distributed job — check accelerate's distributed_type/num_processes")
    for var in MPI_SIZE_VARS:
        if var in env and int(env[var]) > 1 and world == 1:
            raise ConfigError(f"{var}={env[var]} processes were started but each sees world size 1, so they would "
                              f"train {env[var]} independent copies; launch with `accelerate launch --multi_gpu "
                              f"--num_processes {env[var]}` (or torchrun) instead of bare mpirun")
    asked = requested_processes_from_launcher(launcher_cmdline)
    if asked and asked[0] > 1 and world != asked[0]:
        raise ConfigError(f"{asked[1]} asks for {asked[0]} processes but this process sees world size {world}: "
                          "accelerate would run it without a process group; for CPU DDP set distributed_type: "
                          "MULTI_GPU with use_cpu: true (configs/accelerate/cpu_ddp.yaml)")


def check_ddp_checkpointing(world_size: int, gradient_checkpointing: bool, use_reentrant: bool | None,
                            find_unused_parameters: bool | None) -> None:
    """Reentrant checkpointing re-runs forward inside backward, so DDP's unused-parameter search
    marks LoRA weights ready twice ("Expected to mark a variable ready only once")."""
    if world_size > 1 and gradient_checkpointing and use_reentrant is not False and find_unused_parameters is not False:
        raise ConfigError("reentrant gradient checkpointing with DDP and LoRA fails in backward; use "
                          "gradient_checkpointing_kwargs={'use_reentrant': False} or ddp_find_unused_parameters=False")


def gradient_checkpointing_settings(model) -> tuple[bool, bool | None]:
    """(enabled, use_reentrant) as set on an HF model's checkpointed layers."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True and hasattr(m, "_gradient_checkpointing_func"):
            kw = getattr(m._gradient_checkpointing_func, "keywords", {}) or {}
            return True, kw.get("use_reentrant")
    return False, None


def check_target_modules(cfg) -> None:
    """LoRA targets vs. the architecture, from config.json alone (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    hf = _read_config(Path(cfg.model.path), cfg.model.trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(hf, trust_remote_code=cfg.model.trust_remote_code)
    resolve_target_modules(skeleton, cfg.lora.target_modules)


# -- entry points -----------------------------------------------------------------------

def validate(cfg, accelerate_state=None, env=None, launcher_cmdline: list[str] | None = None) -> Engine:
    """All pre-flight checks for a run config; raises ConfigError naming the fix."""
    env = os.environ if env is None else env
    engine = engine_from_env(env, accelerate_state)
    check_world(engine, env, _parent_cmdline() if launcher_cmdline is None else launcher_cmdline)
    q = cfg.model.quant
    check_storage_dtype(engine, q.storage_dtype, q.load_in_4bit)
    check_optimizer(engine, cfg.train.optimizer)
    if cfg.model.path and Path(cfg.model.path).exists():
        check_target_modules(cfg)
    return engine


def check_engine_applied(engine: Engine, distributed_type: str) -> None:
    """The launcher asked for FSDP; refuse when accelerate set up something else instead. (DeepSpeed is
    not checked here: TrainingArguments' state reads MULTI_CPU on a CPU, yet the Trainer's own
    Accelerator does wrap the model in a DeepSpeedEngine — tests/test_scale_distributed.py.)"""
    dt = str(distributed_type).rsplit(".", 1)[-1].upper()
    want = {"fsdp": "FSDP"}.get(engine.name)
    if want and dt != want:
        cpu = " on a CPU (accelerate only turns a GPU-type multi-process setup into FSDP; MULTI_CPU never is)" \
            if dt == "MULTI_CPU" else ""
        raise ConfigError(f"the accelerate config asks for {want} but accelerate set up {dt}{cpu}, so the run "
                          f"would train {'as plain DDP' if dt.startswith('MULTI') else 'unsharded'} without saying "
                          "so; on a CPU use configs/accelerate/cpu_ddp.yaml or cpu_zero2.yaml/cpu_zero3.yaml, "
                          "or run FSDP on GPUs (configs/accelerate/fsdp_qlora.yaml)")


def validate_training(model, training_args, world_size: int | None = None, engine: Engine | None = None) -> None:
    """Checks that need the built model and TrainingArguments."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    state = getattr(training_args, "distributed_state", None)
    if engine is not None and state is not None:
        check_engine_applied(engine, state.distributed_type)
    enabled, reentrant = gradient_checkpointing_settings(model)
    check_ddp_checkpointing(world, enabled, reentrant, getattr(training_args, "ddp_find_unused_parameters", None))


def checkpoint_bytes(model, optimizer: str) -> int:
    """Bytes one checkpoint takes: trainable weights (fp32) + optimizer state + a margin for RNG/scheduler/json."""
    state = {"adamw_torch": 8, "paged_adamw_32bit": 8}.get(optimizer, 2)
    n = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n + trainable * state + (1 << 20)


def check_disk_space(out: Path, need_bytes: int, free_bytes: int | None = None) -> None:
    """Refuse to start a run whose checkpoints and adapters cannot fit on the output disk."""
    import shutil
    free = shutil.disk_usage(out).free if free_bytes is None else free_bytes
    if free < need_bytes:
        raise ConfigError(f"train.output_dir {out} has {free / 2**20:.1f} MiB free but this run writes up to "
                          f"{need_bytes / 2**20:.1f} MiB (checkpoints kept + adapters); free space, lower "
                          "train.save_total_limit, or choose another train.output_dir")
