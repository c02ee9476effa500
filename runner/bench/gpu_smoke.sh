#!/usr/bin/env bash
# GPU smoke check (well under 6 minutes on one H100/H200): the runs that take the CUDA path's risky turns —
# bf16 autocast into FlexAttention on packed rows, compiled training, CUDA-graph decoding against
# transformers, compiled MoE, a 124M step — with TORCH_LOGS=recompiles,graph_breaks in one log.
#   bash runner/bench/gpu_smoke.sh                 # on the GPU machine, carry .whl (../shared/gpu/README.md)
#   GPU_TINY=1 bash runner/bench/gpu_smoke.sh      # the same runs at tiny sizes on this machine
# Results: $OUT/versions.json, $OUT/<run>/results.json, $OUT/steps.tsv, $OUT/gpu_smoke.log, $OUT/summary.md.
source "$(dirname "$0")/gpu_lib.sh"
SECTIONS=("$@")
setup

if [ "$TINY" = 1 ]; then
  DEFAULT_SIZE=(model.n_layers=2 train.max_steps=6 train.eval_every=3 train.eval_batches=2 train.final_eval_batches=2
                train.batch_size=4 data.seq_len=64)
  BENCH_SIZES=(bench.warmup=0 bench.repeats=1 bench.new_tokens=4 "bench.cpu.batch_sizes=[1]" "bench.cpu.prompt_lengths=[16]"
               "bench.cpu.kernel_seq_lens=[64]")
  GPT2_124M=(model.d_model=64 model.n_layers=2 model.n_heads=4 data.seq_len=64 train.batch_size=2)
  MOE_SIZE=(model.n_layers=2 train.max_steps=4 train.batch_size=4 data.seq_len=64)
else
  DEFAULT_SIZE=(train.max_steps=40 train.eval_every=20 train.eval_batches=4 train.final_eval_batches=8)
  BENCH_SIZES=(bench.warmup=1 bench.repeats=3 bench.new_tokens=32 "bench.gpu.batch_sizes=[1,8]"
               "bench.gpu.prompt_lengths=[128]" "bench.gpu.kernel_seq_lens=[1024]")
  GPT2_124M=(model.d_model=768 model.n_layers=12 model.n_heads=12 model.vocab_size=50304 data.seq_len=1024
             train.batch_size=16)
  MOE_SIZE=(train.max_steps=20 train.batch_size=16)
fi
QUIET=(train.checkpoint_every=0 train.device=$DEVICE)

# The default `python run.py` (gqa_rope, packed rows, kernel=auto: FlexAttention, bf16, compiled), then its bench.
wants default && step default_train 150 "${DEFAULT_SIZE[@]}" "${QUIET[@]}" "${BENCH_SIZES[@]}"
# Tiny phi3: compiled (CUDA-graph) decode against transformers, logits and greedy tokens compared.
wants phi3 && step phi3_decode 120 task=bench model=phi3 bench.compile=true \
  bench.reference=true bench.run.train=false bench.run.kernels=false "${BENCH_SIZES[@]}" train.device=$DEVICE
# MoE compiled: training steps and the compiled decode step (no graph breaks expected in the log).
wants moe && step moe_compiled 120 model/ffn=moe train.compile=true bench.compile=true bench.run.kernels=false \
  bench.run.prefill=false train.eval_every=0 train.final_eval_batches=2 "${MOE_SIZE[@]}" "${QUIET[@]}" "${BENCH_SIZES[@]}"
# One 124M GPT-2 training step, compiled (a couple, so the first is warm-up).
wants gpt2 && step gpt2_124m_step 150 model=gpt2 "${GPT2_124M[@]}" train.max_steps=2 train.warmup_steps=1 \
  train.compile=true train.eval_every=0 train.final_eval_batches=1 train.log_every=1 train.bench=false "${QUIET[@]}"
finish
