"""Attention as it runs: the public calls, the plan object and what makes them fit a training step.

* :mod:`.api` -- ``distattn.plan`` and ``distattn.attention`` (and ``local_attention``);
* :mod:`.plans` -- :class:`~.plans.Plan`: a schedule with its executor, ``shard``/``unshard``/``stats``;
* :mod:`.ops` -- attention as ``torch.library`` custom ops, so ``torch.compile`` traces through it;
* :mod:`.varlen` -- ``distattn.varlen_attention``: FlashAttention's varlen call over ranks;
* :mod:`.pingpong` -- nano-batches through the layers, transfers hidden behind compute;
* :mod:`.plan_cache` -- ``distattn.PlanCache``, shared by the trainer and the adapters;
* :mod:`.oracle` -- ``distattn.reference_attention``: dense single-device attention, the tests' oracle.
"""
