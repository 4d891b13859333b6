"""Reading models and adapters, writing sharded safetensors into an atomic output folder."""
