"""Every byte of weights and checkpoints in and out, in any layout.

    dcp.py                resumable training checkpoints (DCP: model + optimizer, keyed by parameter name, so a
                          checkpoint loads into any dp/tp/pp/vpp layout), ``latest``, resume, damaged-checkpoint
                          fallback
    integrity.py          per-file checksums (manifest), a ``.metadata`` reader that runs no code, disk room
    weights.py, paths.py  safetensors weight files (``init_from``, the weights a run leaves), where they are
    sharded_weights.py    each rank reads / writes only its TP and FSDP share of the full weights
    safetensors_stream.py a safetensors file written tensor by tensor
    pretrained.py         pretrained parts from local files: HF LLaMA, timm SigLIP, SAM
    hf_dir.py, hf_llama.py, deepseek_vl*.py   the formats others read: HF LLaMA and DeepSeek-VL release dirs

The key maps between our names and those formats' are pure functions beside the model
(``models/state_dict_adapter.py``). Nothing here is half-written: files go to a temporary name and are renamed.
"""
