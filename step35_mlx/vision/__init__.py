"""Step 3.7 Flash vision: preprocessing, Perception Encoder, projector and image prompts."""
