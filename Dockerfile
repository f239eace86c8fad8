# GPU image for multi-node training: NGC PyTorch (CUDA, NCCL, torch, torchvision, transformer-engine and Apex
# preinstalled). Build: docker build -t vlpretrain .
# Run:   torchrun --nnodes N --nproc_per_node 8 ... -m vlpretrain train --config configs/deepseek-vl-7b/stage2.yaml
FROM nvcr.io/nvidia/pytorch:25.03-py3

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/vlpretrain
# dependencies first so code edits do not invalidate this layer; the image's own torch stays in place
COPY setup.py README.md ./
RUN mkdir -p vlpretrain data_tools && touch vlpretrain/__init__.py data_tools/__init__.py \
    && pip install -e ".[logging]" \
    && python -c "import torch, timm, tokenizers; print(torch.__version__, timm.__version__)"
COPY vlpretrain vlpretrain
COPY data_tools data_tools
COPY configs configs
COPY launch launch
COPY bench bench

ENTRYPOINT ["python", "-m", "vlpretrain"]
CMD ["--help"]
