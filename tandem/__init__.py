"""tandem: disaggregated LLM serving over NATS, KV transfer through NIXL."""

__version__ = "0.1.0"
