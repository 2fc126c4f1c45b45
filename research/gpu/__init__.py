"""Training on a lent GPU whose image has torch but nothing else: pack, run, continue."""
