"""LoftQ: initialize LoRA so that the quantized base plus the adapter approximates the dense weight.

  algorithm   LoftQ on one weight (alternating quantization and rank-r fits), the result types
  calibration activation-aware whitening from calibration text
  quantizers  the base quantizers LoftQ alternates with (NF4/FP4, uniform intN)
  apply       LoftQ on a whole model: streamed load, in-place requantize, adapters
  base_file   the LoftQ base on disk (its bytes differ from quantize(W))
"""
from lowbit.methods.loftq.algorithm import LayerReport, LoftQResult, loftq_weight, lora_scaling
from lowbit.methods.loftq.apply import (
                                        apply_loftq,
                                        loftq_calibrated,
                                        loftq_init,
                                        loftq_load_model,
                                        loftq_quantize_model,
                                        loftq_requantize,
)
from lowbit.methods.loftq.base_file import (
                                        LOFTQ_BASE_FILE,
                                        LOFTQ_REPORT_FILE,
                                        check_loftq_base,
                                        load_loftq_base,
                                        save_loftq_base,
)
from lowbit.methods.loftq.quantizers import BaseQuantizer

__all__ = ["LOFTQ_BASE_FILE", "LOFTQ_REPORT_FILE", "BaseQuantizer", "LayerReport", "LoftQResult", "apply_loftq",
           "check_loftq_base", "load_loftq_base", "loftq_calibrated", "loftq_init", "loftq_load_model",
           "loftq_quantize_model", "loftq_requantize", "loftq_weight", "lora_scaling", "save_loftq_base"]
