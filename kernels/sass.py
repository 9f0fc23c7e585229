"""``python -m distattn.kernels.sass`` (one kernel's SASS loops): the documented command, kept at its
old path. The tool itself is :mod:`distattn.kernels.tools.sass_cli`; this file only runs it (never
imports it), so the kernels library loads none of its developer tools."""

import runpy

if __name__ == "__main__":
    runpy.run_module("distattn.kernels.tools.sass_cli", run_name="__main__", alter_sys=True)
