"""Download and quantize checkpoints into MLX folders.

- ``download.resolve_source``: a local folder, or a Hub repo downloaded (disk checked first);
- ``quantize.convert_checkpoint``: streaming, resumable conversion with a recipe;
- ``verify.verify``: header-only check of a converted folder;
- ``dryrun``: exact sizes per recipe and which Macs they fit;
- ``source``: source validation (incl. FP8), over ``step35_mlx.safetensors_io`` (the header reader and shard writer);
- the ``convert`` / ``verify`` / ``quant-eval`` commands live in ``step35_mlx.cli.convert``.
"""
