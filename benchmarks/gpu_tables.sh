#!/usr/bin/env bash
# The GPU tables of BENCHMARKS.md in one go, on a CUDA machine with PyTorch and transformers:
#   bash benchmarks/gpu_tables.sh [OUT_DIR] [PART]
# PART: table (bench, bf16, four presets, memory), compare (--compare hf, eager), decode (eager vs
# compiled vs CUDA graphs), compiled (--compare hf --compile, bf16), or all (the default) for those
# four; speed: the speed tables in one call of under 10 minutes (training against HF, compiled,
# bf16, tiny to large; the MFU of large and of the GPT-2 preset; decoding as a CUDA graph, tiny to
# medium), for a lent GPU with little time:
#   bash benchmarks/gpu_tables.sh bench_out/gpu speed
set -u
out=${1:-bench_out/gpu}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
quiet() { grep --line-buffered -v "it/s]"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
$py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
if [[ $part == all || $part == table ]]; then
  timeout 300 $py -m mini_transformer bench --steps 20 --out "$out/table" 2>&1 | quiet
fi
if [[ $part == all || $part == compare ]]; then
  timeout 150 $py -m mini_transformer bench --compare hf --steps 20 --out "$out/compare" 2>&1 | quiet
fi
if [[ $part == all || $part == decode ]]; then
  timeout 200 $py benchmarks/decode_compile_modes.py --device cuda --dtype bf16 --presets tiny small 2>&1 | quiet
fi
if [[ $part == all || $part == compiled ]]; then
  timeout 300 $py -m mini_transformer bench --compare hf --compile --dtype bf16 --steps 20 \
    --out "$out/compiled" 2>&1 | quiet
fi
if [[ $part == speed ]]; then
  timeout 260 $py -m mini_transformer bench --compare hf --compile --dtype bf16 --steps 10 \
    --presets tiny small medium large --out "$out/speed_compare" 2>&1 | quiet
  timeout 200 $py -m mini_transformer bench --compile --dtype bf16 --steps 10 --no_memory \
    --presets large gpt2 --out "$out/speed_mfu" 2>&1 | quiet
  timeout 120 $py benchmarks/decode_compile_modes.py --device cuda --dtype bf16 --presets tiny small medium 2>&1 | quiet
fi
