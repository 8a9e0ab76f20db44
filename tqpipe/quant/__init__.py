"""Pure TurboQuant math: arrays and numbers in, arrays out. No I/O, no logging.

- ``rotation``: random-sign block-Hadamard rotation along the input dimension.
- ``codebook``: Lloyd-Max levels for a standard normal source.
- ``scales``: one scale per group of input elements, and index assignment.
- ``packing``: dense b-bit index packing into uint32 words.
"""
