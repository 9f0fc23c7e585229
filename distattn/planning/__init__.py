"""A packed sequence and its plan, as data: which token sees which, who holds it, and what each rank does.

No process group is needed here, and no GPU: everything is a pure function of document lengths.

* :mod:`.masks` -- document masks, windows and :class:`~.masks.SliceMask`; the area (visible pairs) of each;
* :mod:`.doclens` -- document-length samples and mask presets for benchmarks and the simulator;
* :mod:`.labels` -- next-token labels that never cross a document;
* :mod:`.layout`, :mod:`.strided` -- which rank holds which token (:class:`~.layout.Layout`, contiguous,
  zigzag, document, strided);
* :mod:`.packing` -- documents into balanced micro-batches (``distattn.pack_balanced``);
* :mod:`.schedule`, :mod:`.program` -- a schedule (phases of kernel calls and transfers) and the program
  each rank runs, the one timeline the executors and the simulator share;
* :mod:`.wire` -- how rows are encoded for transfer (their own dtype or FP8), which the schedule prices.
"""
