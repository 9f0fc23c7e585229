"""Training: the reference model, packed-document data, the trainer (``distattn train CONFIG``)."""
