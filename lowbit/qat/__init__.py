"""Quantization-aware training: fake quant of weights, activations and the KV cache.

    model = lowbit.qat.prepare(model, "w4a8kv8")   # train with fake quant (QAT + LoRA: after add_lora)
    model = lowbit.qat.convert(model)              # real codes; same forward
    lowbit.qat.save_quantized(model, "out/")       # safetensors + self-describing metadata
"""
from .config import PRESETS, QATConfig, QuantizerConfig, preset_config, resolve
from .fake_quant import FakeQuantizer
from .prepare import calibrate, convert, prepare, quantizers, set_step, target_linears, unprepare
from .quantized import QuantizedLinear
from .serialize import load_quantized, save_quantized

__all__ = ["PRESETS", "FakeQuantizer", "QATConfig", "QuantizedLinear", "QuantizerConfig", "calibrate", "convert",
           "load_quantized", "prepare", "preset_config", "quantizers", "resolve", "save_quantized", "set_step",
           "target_linears", "unprepare"]
