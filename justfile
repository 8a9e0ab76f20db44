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
