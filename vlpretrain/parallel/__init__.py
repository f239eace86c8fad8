"""Parallelism applied over the plain model by small functions, process groups from one device mesh:
tensor/sequence parallel (``tensor``), images across the TP group (``vision_split``), FSDP2 (``fsdp``),
activation checkpointing, pipeline stages and schedules (``pipeline``), the vision-aware splitter
(``pipeline_cost``, ``pipeline_split``, ``pipeline_split_mix``); ``engine`` puts them together for one rank.
"""
