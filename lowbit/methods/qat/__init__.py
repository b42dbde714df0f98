"""Quantization-aware training: fake quant of weights, activations and the KV cache.

    model = lowbit.methods.qat.prepare(model, "w4a8kv8")   # train with fake quant (QAT + LoRA: after add_lora)
    model = lowbit.methods.qat.convert(model)              # real codes; same forward
    lowbit.methods.qat.save_quantized(model, "out/")       # safetensors + self-describing metadata
    # GGUF file types (prepare(model, "gguf-q4_k_m")): save_dense(model, "out/") → lowbit export out/ x.gguf
"""
from lowbit.methods.qat.config import PRESETS, QATConfig, QuantizerConfig, preset_config, resolve
from lowbit.methods.qat.fake_quant import FakeQuantizer
from lowbit.methods.qat.gguf import save_dense
from lowbit.methods.qat.prepare import calibrate, convert, prepare, quantizers, set_step, target_linears, unprepare
from lowbit.methods.qat.quantized import QuantizedLinear
from lowbit.methods.qat.serialize import load_quantized, save_quantized

__all__ = ["PRESETS", "FakeQuantizer", "QATConfig", "QuantizedLinear", "QuantizerConfig", "calibrate", "convert",
           "load_quantized", "prepare", "preset_config", "quantizers", "resolve", "save_dense", "save_quantized", "set_step",
           "target_linears", "unprepare"]
