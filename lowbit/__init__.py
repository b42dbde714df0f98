"""lowbit: fine-tune LLMs in low precision.

Flow of the package, one folder per stage (each imports only the stages before it):
  utils/, config/, errors   atomic I/O, hashing, run record; the config engine
  format/    NF4/FP4 codes, the bitsandbytes-compatible 4-bit layout, intN grids (the reference math)
  kernels/   torch.library ops with reference, CPU C++ and CUDA backends
  modules/   Linear4bit and the LoRA glue;  models/  loading HF causal LMs straight into 4-bit
  methods/   qat/, loftq/, data_gen/ (LLM-QAT self-generated data)
  distributed/, estimate/   scale-out checks and checkpoints; the memory estimator
  recipes/   the training run as phases (QLoRA, QAT, distillation)
  export/    merge and export (peft, HF, bnb-4bit, GGUF)
"""
__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend logs a warning on import when the optional `kernels` package
# (its repacked inference GEMM) is absent; lowbit never uses that path.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
