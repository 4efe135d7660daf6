"""Reading and writing checkpoints: safetensors shards, indexes, atomic files and directories."""
