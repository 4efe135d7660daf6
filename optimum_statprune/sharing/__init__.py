"""What leaves the machine: the pruning manifest, verification, model card and the Hub."""
