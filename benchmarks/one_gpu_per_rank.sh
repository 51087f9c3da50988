#!/bin/bash
# `mlx.launch --backend ring` on one host with several GPUs starts every rank on GPU 0; this
# gives rank r GPU r: mlx.launch --backend ring -n 2 -- benchmarks/one_gpu_per_rank.sh -m ...
export CUDA_VISIBLE_DEVICES=${MLX_RANK}
exec python3 "$@"
