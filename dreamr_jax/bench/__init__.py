"""Measurement library of the benchmark scripts (scripts/bench_*.py, check_cost.py,
validate_costmodel.py, ...), which are its command lines.

- `timing`: best / median / mean of N timed calls after warm-up, the XLA compilations made in
  the timed calls (`dreamr_jax.compiles`), and the CPU quietness check (`CpuShare`,
  `wait_quiet`) for machines others share;
- `bandwidth`: memory bandwidth (copy, read) and matmul rate of the host and the device;
- `hlo`: a compiled decode step's HLO instructions in categories, timed from a profiler trace;
- `runner`: one measurement per fresh process, its progress streamed, its failure recorded;
- `models`: the one Qwen3-VL config factory for random-weight test and benchmark models
  (`qwen3_vl_dict`, on `assets.qwen3_vl_config`), the tiny draft/target pairs, transformers twins;
- `report`: logs, tables, JSON, the machine's description;
- the benchmarks themselves: `decode` (CPU decode vs transformers), `gpu` (int4 vs dense on a
  GPU, projected speedup), `spec` (the speculative machinery's cost), `costs` (the cost model
  against measured calls), `world` (the embedded world's models: reading, solving, judging).

Modules import jax, torch and transformers inside their functions: importing one is cheap.
"""
