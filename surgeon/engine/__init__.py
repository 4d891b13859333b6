"""Layer-by-layer execution, masks, streaming top-k and spill storage. Knows nothing of recipes or click."""
