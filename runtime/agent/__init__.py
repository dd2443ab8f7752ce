"""Device agent: runs the head slice on the board, streams features to a worker, follows plans."""
