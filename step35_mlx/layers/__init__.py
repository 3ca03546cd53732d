"""Building blocks of the Step 3.5 graph: attention, SwiGLU/MoE feed-forwards, norms, RoPE."""
