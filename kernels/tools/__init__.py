"""The kernels' developer tools: commands for whoever works on the Triton kernels, not part of the
library (nothing in :mod:`distattn.kernels` imports them). Each command keeps its documented name,
``python -m distattn.kernels.<name>``, through a forwarder at the old path that runs the module here.

* :mod:`.aot` -- ``python -m distattn.kernels.aot``: compile every kernel x config x arch x dtype x
  head dims x variant for sm_80/sm_90a without a GPU; report registers, spills, shared memory,
  atomics and the MMA work per tile.
* :mod:`.sass_cli` -- ``python -m distattn.kernels.sass``: one case's (or any cubin's) SASS loops.
* :mod:`.bench` -- ``python -m distattn.kernels.bench``: on a GPU, fwd, bwd and fwd+bwd TFLOP/s of
  the triton backend beside FlashAttention-2, FlashAttention-3 and SDPA.
* :mod:`.cases` -- what ``aot`` and ``sass_cli`` share: the case matrix, and compiling cases in
  clean spawned workers into rows.
* :mod:`.sass` -- reading SASS: disassembly, loops, atomics, MMA counts (for ``cases`` and
  ``sass_cli``).

Imports point one way: ``sass`` <- ``cases`` <- (``aot``, ``sass_cli``).
"""
