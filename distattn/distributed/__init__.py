"""Ranks and what passes between them: starting processes, process groups and meshes, the communicator.

* :mod:`.spawn` -- :func:`~.spawn.run_distributed`: N gloo processes (a forkserver, :mod:`._forkserver`),
  signals, and one error naming the rank that failed;
* :mod:`.virtual` -- :func:`~.virtual.run_virtual`: N ranks as threads of one process (large worlds);
* :mod:`.mesh` -- device meshes with named axes (:class:`~.mesh.ParallelDims`, :func:`~.mesh.usp_mesh`);
* :mod:`.comm` -- :class:`~.comm.Comm`, transfers with timeouts, and the agreement that fails fast
  (:class:`~.comm.PeerFailed`); :mod:`.phases` tells the launcher which phase a rank is in;
* :mod:`.log` -- rank-aware logging (``distattn.configure_logging``);
* :mod:`.trace` -- the names of a step's phases in a profile; :mod:`.timing` -- timed calls across ranks.
"""
