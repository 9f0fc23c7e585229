"""What work costs: the shapes of models and GPUs, the attention kernel's time, the network's collectives.

Standard library and numpy only, and nothing of the rest of distattn: the planners, the simulator and
the benchmarks all price work with these.

* :mod:`.model_shape` -- model presets (``llama3-8b``, ...) and GPUs (peak FLOP/s, memory);
* :mod:`.cost` -- attention FLOPs and a task's time (:class:`~.cost.TileCost`, :class:`~.cost.Roofline`);
* :mod:`.tiles` -- the kernel's time from its tiles, fitted to measured latencies;
* :mod:`.network`, :mod:`.network_csv` -- a cluster's links and collectives
  (:class:`~.network.NetworkProfile`), read from nccl-tests tables;
* :mod:`.jsonfile` -- the one reader of the JSON inputs above, with one-line errors.
"""
