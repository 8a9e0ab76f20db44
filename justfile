# The README's commands, for those who have `just`.

# set up OpenBLAS (Linux) and the .venv
setup:
    bash .ci/setup

# build the default recipe (or: just build recipe=<name> stages=[validate,publish])
build *ARGS: setup
    .venv/bin/tqpipe {{ARGS}}

# run the whole test suite, the end-to-end SmolLM2 build included
test *ARGS: setup
    .venv/bin/python -m pytest {{ARGS}}

# the fast tests only
test-fast:
    .venv/bin/python -m pytest -m "not slow"

# print a recipe's plan (every tensor's fate, the predicted size) without building
plan RECIPE:
    .venv/bin/tqpipe recipe={{RECIPE}} plan_only=true

# benchmarks (tables land in outputs/bench/)
bench-quality *ARGS:
    .venv/bin/python bench/quality_vs_affine.py {{ARGS}}

bench-runtime *ARGS:
    .venv/bin/python bench/runtime_speed.py {{ARGS}}

bench-pack-speed *ARGS:
    .venv/bin/python bench/pack_speed.py {{ARGS}}

bench-pack-scale *ARGS:
    .venv/bin/python bench/pack_scale.py {{ARGS}}

bench-kernels:
    .venv/bin/python bench/kernel_speed.py
