"""Download and quantize checkpoints into MLX folders.

- ``download.resolve_source``: a local folder, or a Hub repo downloaded (disk checked first);
- ``quantize.convert_checkpoint``: streaming, resumable conversion with a recipe;
- ``verify.verify``: header-only check of a converted folder;
- ``dryrun``: exact sizes per recipe and which Macs they fit;
- ``source`` / ``safetensors_io``: source validation (incl. FP8) and the streaming shard reader/writer;
- ``commands``: the ``convert`` / ``verify`` / ``quant-eval`` CLI commands.
"""
