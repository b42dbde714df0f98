"""The on-disk/in-memory 4-bit format: code books, blockwise reference math, `Quantized4bit`."""
from lowbit.format.codes import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, code_4bit, dynamic_map
from lowbit.format.tensor import Quantized4bit, dequantize_reference, double_quantize, quantize

__all__ = ["BLOCKSIZES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "Quantized4bit", "code_4bit", "dequantize_reference",
           "double_quantize", "dynamic_map", "quantize"]
