"""Secure aggregation by pairwise masking: the server learns the sum of a round's updates, not one of them."""
