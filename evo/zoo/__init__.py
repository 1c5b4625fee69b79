"""Where the models to merge come from: the zoo built from shipped text (``build``), synthetic
models for tests and benchmarks (``synthetic``) and GGUF files converted to safetensors (``gguf``).
"""
