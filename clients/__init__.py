"""Client code for hospital HIS and pharmacy POS integrators (see the README)."""
