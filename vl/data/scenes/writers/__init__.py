"""One writer per real file format of the embedded scene corpus (VQA, captions and features: ``corpus``)."""
