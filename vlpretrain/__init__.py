"""vlpretrain: distributed pretraining for DeepSeek-VL-style vision-language models."""

__version__ = "0.1.0"
