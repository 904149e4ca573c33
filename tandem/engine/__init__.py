"""The inference engine: model, weights, tokenizer, scheduler and executors (no NATS in here).

Modules: :mod:`.config` (model and engine settings; the worker's CLI derives from
``EngineConfig``), :mod:`.weights` (GGUF → safetensors preparation and loading), :mod:`.tokenizer`
(tokenizer, chat template, incremental detokenizer), :mod:`.model` (the paged-KV llama),
:mod:`.scheduler` (continuous batching), :mod:`.executor` (the seam the engine steps through),
:mod:`.runner` (``ModelExecutor``: the real model), :mod:`.mock` (``MockExecutor``: no model,
Dynamo mocker timing), :mod:`.engine` (``LLMEngine``). Importing :mod:`.engine` does not import
torch; only building a model engine does.
"""
