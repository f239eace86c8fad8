"""Plain PyTorch modules that know nothing about parallelism or files: the hybrid vision encoder, the adaptor,
the LLaMA-style decoder, and ``vlm.DeepSeekVL`` as a chain of pipeline-cuttable parts (``embed``, ``layers.i``,
``head``). Parallelism is applied over them by ``vlpretrain.parallel``; checkpoints by ``vlpretrain.checkpoint``.
"""
