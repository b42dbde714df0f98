"""lowbit: fine-tune LLMs in low precision.

Flow of the package, one folder per stage:
  format/   NF4/FP4 codes and the bitsandbytes-compatible 4-bit layout (the reference math)
  kernels/  torch.library ops with reference, CPU C++ and CUDA backends
  modules/  Linear4bit and the LoRA glue
  models/   loading HF causal LMs straight into the 4-bit base
  train/, qat/, data_gen/   recipes (QLoRA, QAT, data-free QAT)
  export/   merge, LoftQ and export (peft, HF, bnb-4bit, GGUF)
"""
__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend logs a warning on import when the optional `kernels` package
# (its repacked inference GEMM) is absent; lowbit never uses that path.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
