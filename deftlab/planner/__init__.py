"""Memory planning from a model's config.json alone: shapes (architecture) and the memory model of each phase
(calibration, decomposition, fine-tuning), as pure functions; `deftlab plan` prints them."""
