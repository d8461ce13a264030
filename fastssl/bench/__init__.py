"""Tools that describe the fused ops without a GPU: the dispatch counter and the traffic model."""
