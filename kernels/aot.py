"""``python -m distattn.kernels.aot`` (compile every Triton kernel for sm_80/sm_90a without a GPU): the documented command, kept at its
old path. The tool itself is :mod:`distattn.kernels.tools.aot`; this file only runs it (never
imports it), so the kernels library loads none of its developer tools."""

import runpy

if __name__ == "__main__":
    runpy.run_module("distattn.kernels.tools.aot", run_name="__main__", alter_sys=True)
