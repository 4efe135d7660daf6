"""Pure tensor math: channel statistics, scores, masks, compensation, OWL, SparseGPT's solver."""
