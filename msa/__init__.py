"""MiniMax Sparse Attention: reference math and the attention modules."""
