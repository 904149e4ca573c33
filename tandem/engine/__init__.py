"""The inference engine: model, weights, tokenizer, scheduler and runner (no NATS in here).

Modules: :mod:`.config` (model and engine settings), :mod:`.weights` (GGUF → safetensors
preparation and loading), :mod:`.tokenizer` (tokenizer, chat template, incremental
detokenizer), :mod:`.model` (the paged-KV llama).
"""
