"""The block engine and its model plumbing: blocks and targets, capture, offload, conversion, streaming."""
