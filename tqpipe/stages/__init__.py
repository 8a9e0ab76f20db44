"""The six stages, in build order. Each module exposes the same interface:

- ``NEEDS``: names of the stages whose folders it reads;
- ``settings(recipe) -> dict``: the part of the recipe its result depends on;
- ``run(ctx: StageContext) -> dict``: write the artifact into ``ctx.out`` and
  return a short summary for the manifest and the console.
"""

from tqpipe.stages import codebook, fetch, pack, publish, rotate, validate

STAGES = {
    "fetch": fetch,
    "rotate": rotate,
    "codebook": codebook,
    "pack": pack,
    "validate": validate,
    "publish": publish,
}
